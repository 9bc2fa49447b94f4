"""Evaluation: the official protocol (protocol.py) with its forecasters and metrics, the validation sets a
config declares (setup.py), pictures of features and forecasts (pictures.py), and the demo's report
(demo.py). Above models/data/tasks; the trainer calls a protocol's hook through `config.eval.fn`."""
