"""Registers the first-party zoo (``zoo:<name>``).

Counts are derived by hand from each architecture (the model docstrings repeat them):

* ``activation_sites``: call sites of an activation binarizer (a module called at two
  places counts 2; a sign inside a conv's forward on that conv's input counts 1 per conv);
* ``weight_binarizers``: binarizing ops whose input depends only on parameters, one per
  binary layer (first conv / first FC / last FC and ResNet shortcuts are real).

Factories take ``num_classes``, ``in_chans``, ``width`` (channel multiplier; the structure
and hence the counts never depend on it) and ``input_size`` (used where the flatten size
depends on it; accepted and ignored by models with adaptive pooling).
"""
from __future__ import annotations

from . import models_paper as P
from . import models_styles as S

MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)
IMAGENET = (3, 224, 224)

# name, factory, input_shape, activation_sites, weight_binarizers, style, tags, description
# The comment after each row is the count derivation.
_PAPER = [
    ("mlp", P.mlp, MNIST, 2, 2, "inline-sign-detach-ste", ("paper", "mnist", "mlp"),
     "Binary MLP 784-H-H-H-10 (H=512): real first/last FC, 2 binary hidden FC layers."),
    # sites: sign before bfc2 and before bfc3; weights: bfc2, bfc3
    ("lenet5", P.lenet5, MNIST, 3, 3, "sign-module", ("paper", "mnist", "maxpool"),
     "Binary LeNet-5: real conv6, binary conv16 / fc120 / fc84, real fc10."),
    # sites: act1 (after pool1+BN), act2 (after pool2+BN), act3 (after fc3+BN);
    # weights: conv2, fc3, fc4
    ("vgg-small", P.vgg_small, CIFAR, 5, 5, "sign-module", ("paper", "cifar10", "maxpool"),
     "The paper's vgg-small: conv 64,64,128,128 with MaxPool after conv2/conv4, FC 512,512,C."),
    # sites: act1..act5 (after conv1, pool2, conv3, pool4, fc1); weights: conv2..conv4, fc1, fc2
    ("vgg-small-avgpool", P.vgg_small_avgpool, CIFAR, 5, 5, "sign-module",
     ("paper", "cifar10", "avgpool"),
     "vgg-small with AvgPool instead of MaxPool (claim 3: symmetric shift curve)."),
    # same graph as vgg-small
    ("resnet20-bireal", P.resnet20_bireal, CIFAR, 18, 18, "bireal-detach-ste",
     ("paper", "cifar10", "resnet", "double-skip"),
     "CIFAR ResNet-20 with Bi-Real double skip: 18 binary 3x3 convs, each with a shortcut."),
    # 3 stages x 3 blocks x 2 convs = 18 units, 1 BinaryActivation + 1 HardBinaryConv each
    ("resnet20-bireal-prelu", P.resnet20_bireal_prelu, CIFAR, 18, 18, "bireal-detach-ste",
     ("paper", "cifar10", "resnet", "double-skip", "prelu"),
     "resnet20-bireal with nn.PReLU(channels) after every add (claim 8: shifting hurts)."),
    ("resnet20-bireal-leakyrelu", P.resnet20_bireal_leakyrelu, CIFAR, 18, 18, "bireal-detach-ste",
     ("paper", "cifar10", "resnet", "double-skip", "leakyrelu"),
     "resnet20-bireal with nn.LeakyReLU(slope) after every add; factory arg slope=0.25."),
    ("xnor-resnet18", P.xnor_resnet18, IMAGENET, 16, 16, "function-apply-inline",
     ("paper", "imagenet", "resnet", "xnor"),
     "XNOR-Net ResNet-18: BN -> BinActive.apply (inline) -> binary conv with mean|W|."),
    # 8 basic blocks x 2 (BN -> BinActive.apply -> conv) = 16 sites, 16 binary convs
    ("bireal-resnet18", P.bireal_resnet18, IMAGENET, 16, 16, "bireal-detach-ste",
     ("paper", "imagenet", "resnet", "bireal"),
     "Bi-Real-Net ResNet-18: 16 Bi-Real units (BinaryActivation + HardBinaryConv + shortcut)."),
    # units [4,4,4,4]
    ("bireal-resnet34", P.bireal_resnet34, IMAGENET, 32, 32, "bireal-detach-ste",
     ("paper", "imagenet", "resnet", "bireal"),
     "Bi-Real-Net ResNet-34: 32 Bi-Real units."),
    # units [6,8,12,6]
    ("reactnet-a", P.reactnet_a, IMAGENET, 26, 31, "shared-module-learnable-bias",
     ("imagenet", "reactnet", "mobilenet", "rsign", "rprelu", "shared-act"),
     "ReActNet-A (MobileNetV1-based): 13 blocks, RSign (LearnableBias + sign), RPReLU."),
    # sites: 13 blocks x 2 calls of the shared binary_activation = 26;
    # weights: 13 binary 3x3 + 8 single 1x1 + 5 channel-doubling blocks x 2 1x1 = 31
]

# Every style model: 2 sites / 2 weight binarizers (skeleton: 2 blocks, each one site in
# front of one binary conv) unless noted.
_STYLES = [
    ("style-torch-sign", S.style_torch_sign, 2, 2, "inline torch.sign after BN, no STE",
     ("no-ste",)),
    ("style-tensor-sign", S.style_tensor_sign, 2, 2, "inline x.sign(), identity STE", ()),
    ("style-function-ste", S.style_function_ste, 2, 2,
     "autograd.Function STE (.apply) inside an activation Module", ("autograd-function",)),
    ("style-detach-ste", S.style_detach_ste, 2, 2, "module with polynomial detach-trick STE", ()),
    ("style-heaviside", S.style_heaviside, 2, 2, "(x > 0).float() with STE, alphabet {0,1}",
     ("alphabet-01",)),
    ("style-where", S.style_where, 2, 2, "torch.where(x >= 0, 1., -1.) (sign(0)=+1), STE", ()),
    ("style-scaled", S.style_scaled, 2, 2, "alpha * sign(x): learnable alpha, then mean|x|",
     ("autograd-function",)),
    ("style-rsign", S.style_rsign, 2, 2, "learnable per-channel bias just before sign (RSign)",
     ("learnable-threshold",)),
    ("style-conv-input", S.style_conv_input, 2, 2,
     "binary conv binarizes its own input and weight (SignSTE.apply) in forward",
     ("autograd-function", "conv-input")),
    # each InputBinarizingConv2d call: 1 site (its input) + 1 weight binarizer
    ("style-control-flow", S.style_control_flow, 2, 2,
     "data-dependent `if` in a block containing an inline sign; a conv that binarizes its input",
     ("untraceable", "conv-input")),
    # GuardedBinaryBlock: 1 inline sign + BinaryConv2d; SelfBinarizingConv2d: 1 + 1
    ("style-shared-act", S.style_shared_act, 3, 3, "one activation module called at 3 places",
     ("shared-act",)),
    # self.act called 3 times, 3 BinaryConv2d
    ("style-temperature", S.style_temperature, 2, 2,
     "tanh(k x) STE with k in a buffer the training loop anneals", ("buffer-schedule",)),
    ("style-numpy-scalar", S.style_numpy_scalar, 2, 2,
     "x.view(x.size(0), np.int64(-1)) in forward", ("untraceable",)),
    # sites act1, act2; weights: BinaryConv2d, BinaryLinear
    ("style-hardtanh", S.style_hardtanh, 2, 2, "BinaryNet: nn.Hardtanh module -> sign", ()),
]


def register_all(api) -> None:
    for name, factory, shape, sites, wbin, style, tags, desc in _PAPER:
        api.register_zoo_model(name, factory, input_shape=shape, num_classes=10,
                               activation_sites=sites, weight_binarizers=wbin,
                               description=desc, style=style, tags=tags)
    for name, factory, sites, wbin, what, tags in _STYLES:
        api.register_zoo_model(name, factory, input_shape=MNIST, num_classes=10,
                               activation_sites=sites, weight_binarizers=wbin,
                               description=f"Small 28x28 BNN; activation binarizer: {what}.",
                               style=name[len("style-"):], tags=("style", "mnist") + tags)
