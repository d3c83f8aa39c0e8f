"""Reading a bundle: its manifest (the contract with the exporter) and its graphs' onnxruntime sessions."""
