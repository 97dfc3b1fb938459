"""Where a fused model goes next: an ONNX file for ONNX Runtime (:mod:`.onnx`), and
``torch.compile`` with the fxfuse Dynamo backend (:mod:`.backend`)."""
