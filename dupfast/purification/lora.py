"""The student: LoRA adapters on the attention projections of the model itself, head trainable.

The teacher is the same model with the adapters disabled (`peft`'s `disable_adapter()`), so purification
never holds two copies of the weights. Target modules are found per architecture from the names of the
model's Linear layers (DUP's choice: the attention projections only).
"""
import torch

# family -> leaf names of the attention projections that get adapters
FAMILIES = {
    "bert": ("query", "key", "value"),                    # BERT, RoBERTa, MiniLM, ELECTRA, XLM-R
    "mpnet": ("q", "k", "v", "o"),                        # MPNet
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),    # Llama, Qwen2, Mistral, SmolLM, Gemma decoders
    "bart": ("q_proj", "k_proj", "v_proj", "out_proj"),   # BART / mBART encoder-decoders
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin"),
}
# classification heads of HF sequence classifiers: trained in full (peft modules_to_save), never adapted
HEADS = ("classifier", "score", "classification_head")


def head_names(model) -> list:
    """Top-level classification heads of a HF sequence classifier."""
    return [name for name, _ in model.named_children() if name in HEADS]


def _linear_names(model, heads):
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not any(name == h or name.startswith(h + ".") for h in heads):
            out.append(name)
    return out


def find_target_modules(model, requested=None):
    """(family, [full module names]) of the attention projections that get LoRA adapters.

    requested: explicit leaf or full names (overrides the per-architecture choice). Raises ValueError naming
    the model's Linear layers when nothing supported is found."""
    heads = head_names(model)
    linears = _linear_names(model, heads)
    leaves = {n.rsplit(".", 1)[-1] for n in linears}
    if requested is not None:
        chosen = [n for n in linears if n in requested or n.rsplit(".", 1)[-1] in requested]
        missing = [r for r in requested if not any(n == r or n.rsplit(".", 1)[-1] == r for n in linears)]
        if missing:
            raise ValueError(f"target_modules {missing} match no Linear layer of the model; its Linear layers "
                             f"are named {sorted(leaves)}")
        return "custom", chosen
    # a family applies when all its projections exist; the largest such family wins (llama beats bart
    # when both q/k/v_proj and o_proj exist)
    best = None
    for family, names in FAMILIES.items():
        if set(names) <= leaves and (best is None or len(names) > len(FAMILIES[best])):
            best = family
    if best is None:
        supported = "; ".join(f"{f}: {'/'.join(n)}" for f, n in FAMILIES.items())
        raise ValueError(f"the model has none of the supported LoRA target modules ({supported}). Its Linear "
                         f"layers are named {sorted(leaves) or 'nothing (no nn.Linear at all)'}; pass "
                         "target_modules=[...] to choose them")
    return best, [n for n in linears if n.rsplit(".", 1)[-1] in FAMILIES[best]]


def attach_student(model, cfg):
    """The model purification trains: LoRA adapters (attach_lora) or, with cfg.use_lora False, the model itself
    with every parameter trainable. Returns (student, family, targets)."""
    if cfg.use_lora:
        return attach_lora(model, cfg)
    for p in model.parameters():
        p.requires_grad_(True)
    return model, "full", []


def attach_lora(model, cfg):
    """Wrap `model` (in place) with LoRA adapters + a trainable head. Returns (peft model, family, targets)."""
    import peft

    family, targets = find_target_modules(model, cfg.target_modules)
    heads = head_names(model) if cfg.train_head else []
    # task_type SEQ_CLS would add the head to modules_to_save by itself: only ask for it when it is trained
    lora_cfg = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                               target_modules=targets, modules_to_save=heads or None,
                               task_type="SEQ_CLS" if cfg.train_head else None)
    # Two notices of peft's, not the caller's, each silenced by its own message (every other warning of
    # get_peft_model reaches the caller): its notice on the SEQ_CLS head names it appends to modules_to_save
    # (the head list is explicit here; peft 0.21 and 0.22 do not emit it), and the transformers 5 FutureWarning
    # its PeftModel.__init__ triggers by reading the deprecated `model.is_gradient_checkpointing`
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*\bmodules_to_save\b", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        student = peft.get_peft_model(model, lora_cfg)
    if cfg.start == "perturb":
        perturb_lora_b(student, cfg.perturb_std, cfg.seed)
    return student, family, targets


def perturb_lora_b(student, std: float, seed: int):
    """LoRA B ~ N(0, std) instead of 0: the student starts a little off the teacher (a measured option)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def teacher_context(model):
    """Context in which `model` computes the teacher: adapters disabled (no-op for a plain model)."""
    import contextlib
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else contextlib.nullcontext()


def trainable_parameters(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def merge(model):
    """Fold the adapters into the base weights; the head copies replace the originals. Returns the base model."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
