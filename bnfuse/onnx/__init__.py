"""The ONNX path: load/save (io), constant lookup, the matcher and the rewrite."""
