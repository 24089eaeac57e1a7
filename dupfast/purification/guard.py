"""Purification as a transaction on the caller's model: on any failure (an error, KeyboardInterrupt) the
model is put back exactly as it was, then the exception goes on.

    with ModelGuard(model, copy_weights=not cfg.use_lora) as guard:
        student = attach_lora(model, cfg)            # adapters, head copies, requires_grad flags
        ...train...
        guard.keep_modules(targets)                  # before merge_and_unload writes into their weights
        purified = merge(student)

What is restored, from what was recorded on entry: the module tree (every module's own children, parameters
and buffers: adapters and peft wrappers go, the original Linear layers and heads come back), attributes peft
added to the model (`peft_config`), the values of every tensor that may have been written in place (all
parameters for full fine-tuning, copied to CPU on entry; the adapted layers' weights, copied just before the
merge writes into them; every buffer), each module's training flag, each parameter's requires_grad and
.grad. With LoRA the base weights are frozen during training, so until the merge no weight copy is needed.

On success the model keeps its new weights and is left in eval mode; the requires_grad flags are those it
came with (peft froze the base weights), and gradients of the run are dropped.
"""
import torch


class ModelGuard:
    def __init__(self, model: torch.nn.Module, copy_weights: bool = False):
        self.model, self.copy_weights = model, copy_weights
        self._saved, self._done = {}, False

    def __enter__(self):
        m = self.model
        self._attrs = set(vars(m))
        self._tree = [(mod, dict(mod._modules), dict(mod._parameters), dict(mod._buffers), mod.training)
                      for mod in m.modules()]
        self._params = dict(m.named_parameters())
        self._flags = {n: p.requires_grad for n, p in self._params.items()}
        self._grads = {n: p.grad for n, p in self._params.items()}
        self._buffers = {n: b.detach().to("cpu", copy=True) for n, b in m.named_buffers()}
        self._buffer_refs = dict(m.named_buffers())
        if self.copy_weights:
            self.keep_tensors(self._params)
        return self

    def keep_tensors(self, names):
        """Copy (to CPU) the current values of these parameters (names as on entry), about to be written in
        place."""
        for n in names:
            if n not in self._saved and n in self._params:
                self._saved[n] = self._params[n].detach().to("cpu", copy=True)

    def keep_modules(self, prefixes):
        """keep_tensors of every parameter (as named on entry) of these modules."""
        prefixes = tuple(p + "." for p in prefixes)
        self.keep_tensors([n for n in self._params if n.startswith(prefixes)])

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self._commit()
        else:
            self.restore()
        return False  # never swallow the exception

    def restore(self):
        """Put the model back as it was on entry (also called directly, when purify ends without a change)."""
        if self._done:
            return
        self._done = True
        with torch.no_grad():
            for mod, children, params, buffers, training in self._tree:
                for store, saved in ((mod._modules, children), (mod._parameters, params), (mod._buffers, buffers)):
                    if store != saved or any(store[k] is not v for k, v in saved.items()):
                        store.clear()
                        store.update(saved)
                mod.training = training
            for name in set(vars(self.model)) - self._attrs:
                delattr(self.model, name)
            for n, value in self._saved.items():
                self._params[n].data.copy_(value.to(self._params[n].device))
            for n, value in self._buffers.items():
                self._buffer_refs[n].copy_(value.to(self._buffer_refs[n].device))
            for n, p in self._params.items():
                p.requires_grad_(self._flags[n])
                p.grad = self._grads[n]

    def _commit(self):
        """The run succeeded: the model has its new weights; give back its own requires_grad flags and drop the
        run's gradients."""
        if self._done:
            return
        self._done = True
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._flags.get(n, p.requires_grad))
            p.grad = self._grads.get(n) if self._params.get(n) is p and not self.copy_weights else None
        self._saved.clear()
