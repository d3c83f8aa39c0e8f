"""The ONNX graphs: traced (torch.onnx) or written from weights (the fused decoder), fused, quantized."""
