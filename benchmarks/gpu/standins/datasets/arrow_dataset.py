from _standin import standin

__getattr__ = standin(__name__)
