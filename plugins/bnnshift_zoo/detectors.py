"""Detectors: binarizer classes of public BNN families (matched by class name, the user's
code is never imported) and of this zoo (matched by type).

Only *activation* binarizers are listed: classes whose forward (or Function.forward)
binarizes its first input. Weight binarizers (``HardBinaryConv`` etc.) and learnable
shifts (ReActNet ``LearnableBias``) are deliberately not listed: a ``LearnableBias`` right
before a binarizer is an existing threshold, which scan finds as the sign's producer.
Public names below are as spelled in the families' reference code.
"""
from __future__ import annotations

from . import layers as L
from . import models_styles as S

_PUBLIC = [
    dict(name="bireal", class_names=("BinaryActivation",),
         description="Bi-Real-Net (liuzechun/Bi-Real-net): BinaryActivation, sign forward, "
                     "piecewise-quadratic detach-trick STE. Its input is the residual stream."),
    dict(name="reactnet", class_names=("BinaryActivation", "RSign"),
         description="ReActNet (liuzechun/ReActNet): LearnableBias (move) + BinaryActivation "
                     "(= RSign); one BinaryActivation module per block called at two places. "
                     "The LearnableBias before it is an existing learnable threshold."),
    dict(name="xnor-net", class_names=("BinActive", "BinActiv"),
         description="XNOR-Net PyTorch ports: BinActive autograd.Function (often legacy, "
                     "non-static) called as BinActive()(x) or BinActive.apply(x) after BN."),
    dict(name="binarynet", class_names=("BinarizeLinear", "BinarizeConv2d", "Binarize"),
        
         description="BinaryNet.pytorch (itayhubara): BinarizeLinear / BinarizeConv2d binarize "
                     "their own input (input.data = Binarize(input.data)) except the first layer; "
                     "an nn.Hardtanh module precedes them."),
    dict(name="ir-net", class_names=("BinaryQuantize",),
         description="IR-Net / RBNN: BinaryQuantize autograd.Function (k, t annealed by the "
                     "training loop) applied inside IRConv2d to its input and its weight."),
    dict(name="larq-like", class_names=("SignSTE", "STESign", "SteSign", "_STESign", "ste_sign",
                                        "ApproxSign", "SwishSign", "MagnitudeAwareSign"),
        
         description="larq-style quantizers ported to PyTorch (ste_sign / approx_sign / "
                     "swish_sign)."),
    dict(name="larq-heaviside", class_names=("SteHeaviside", "STEHeaviside"),
         description="larq-style SteHeaviside: x > 0 -> 1 else 0."),
    dict(name="bitorch", class_names=("Sign", "ApproxSign", "SwishSign", "SteHeaviside",
                                      "ProgressiveSign", "SignFunction", "SwishSignFunction"),
        
         description="bitorch quantizations (Quantization modules and their Functions); the "
                     "same classes quantize weights inside QConv2d/QLinear, so only calls on "
                     "data-dependent inputs are activation sites."),
]

# This zoo's own activation binarizers. Inline ones (torch.sign / x.sign() / torch.where /
# (x > 0).float() written in a block's forward) have no class to list: scan must find them.
_ZOO_PM1_MODULES = (L.SignActivation, L.BinaryActivation, S.StraightThroughSign, S.ApproxSign,
                    S.ScaledSign, S.RSign, S.TemperatureSign)
_ZOO_FUNCTIONS = (L.SignSTE, L.BinActive)


def register_all(api) -> None:
    for d in _PUBLIC:
        api.register_detector(api.Detector(**d))
    api.register_detector(api.Detector(
        name="bnnshift-zoo",
        module_types=_ZOO_PM1_MODULES,
        class_names=tuple(c.__name__ for c in _ZOO_PM1_MODULES + _ZOO_FUNCTIONS),
       
        description="Activation binarizer modules and autograd Functions of the bnnshift zoo. "
                    "SignSTE is also applied to weights (style-conv-input): only calls on "
                    "data-dependent inputs are activation sites.",
    ))
    api.register_detector(api.Detector(
        name="bnnshift-zoo-heaviside",
        module_types=(S.HeavisideSTE,),
        class_names=("HeavisideSTE",),
       
        description="The zoo's {0,1} binarizer (style-heaviside).",
    ))
