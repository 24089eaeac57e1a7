"""Pure-PyTorch layer-transition signals: the oracle the kernels are held to."""
import torch


def layer_transitions_reference(features):
    """features [N, L, d] -> (gram [N, L, L], cosines [N, L-1], concentration [N]).

    cosines: consecutive-layer cosine similarities (0 where a norm is 0).
    concentration: DUP's sigma_1 / sum(sigma) of the consecutive-difference matrix, by explicit SVD."""
    h = features.double()
    gram = h @ h.transpose(1, 2)
    diag = gram.diagonal(dim1=1, dim2=2)
    num = gram.diagonal(offset=1, dim1=1, dim2=2)
    den = (diag[:, :-1] * diag[:, 1:]).sqrt()
    cos = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    sv = torch.linalg.svdvals(h[:, 1:] - h[:, :-1])
    total = sv.sum(-1)
    conc = torch.where(total > 0, sv[:, 0] / total.clamp_min(1e-300), torch.zeros_like(total))
    return gram.float(), cos.float(), conc.float()
