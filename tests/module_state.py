"""What a forward writes on modules: the probe of the "no per-pass state on self" tests."""
import torch


def attribute_writes(model):
    """Record every attribute written on a module of ``model`` while the context is open (but
    ``training``, which ``run_heads`` sets)."""
    modules, writes = set(map(id, model.modules())), []
    original = torch.nn.Module.__setattr__

    def recording(module, name, value):
        if id(module) in modules and name != "training":
            writes.append(f"{type(module).__name__}.{name}")
        original(module, name, value)

    class Recorder:
        def __enter__(self):
            torch.nn.Module.__setattr__ = recording
            return writes

        def __exit__(self, *exc):
            torch.nn.Module.__setattr__ = original

    return Recorder()
