"""What a caller gives, made into processor outputs: images opened and tiled, chats rendered, text tokenized."""
