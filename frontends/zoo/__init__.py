"""Models for tests, benchmarks and `kiln demo`, kept apart from the importers they feed:
`onnx_models` builds ONNX models with onnx.helper (and holds the bundled MNIST CNN file),
`torch_models` writes PyTorch models and exports them with torch.onnx."""
