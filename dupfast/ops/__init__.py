"""dupfast's hot paths, one dispatch point (see _dispatch.py):

    mahalanobis(features, means, whiteners, ...)   multi-layer Mahalanobis distances
    layer_transitions(features, ...)               per-sample layer Gram -> cosines, spectral concentration
    kl_div(student, teacher, weights, ...)         fused KL(p_T || p_S) + gradient, signed row weights
    linear_kl_div(hidden, weight, teacher_hidden, weights, ...)
                                                   LM head + kl_div in row chunks, no [R, V] logits
    token_mahalanobis(hidden, mask, means, whiteners, ...)
                                                   per-row top-k / arg-max token distances, all layers

Each op has a pure-PyTorch reference beside it (`*_reference`) that the tests hold every backend to.
"""
from ._dispatch import available_backends, resolve  # noqa: F401
from .mahalanobis import mahalanobis  # noqa: F401,E402
from .transitions import layer_transitions  # noqa: F401,E402
from .kl import kl_div  # noqa: F401,E402
from .linear_kl import linear_kl_div  # noqa: F401,E402
from .token_mahalanobis import token_mahalanobis  # noqa: F401,E402
