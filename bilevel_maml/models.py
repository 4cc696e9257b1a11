"""Backbones used in the MAML literature.

Normalisation is transductive by default (``track_running_stats=False``): batch statistics are used
in training and evaluation alike, as in the MAML reference code, and the forward pass mutates no
buffers, so it is a pure function of the parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from bilevel_maml._factories import call_with_named_keywords, refuse_taken_name
from bilevel_maml.batch_norm import batch_norm
from bilevel_maml.grouped_conv import grouped_conv2d
from bilevel_maml.relu_and_max_pool import max_pool2d, relu
from bilevel_maml.validation import check_positive_int


DOWNSAMPLING = ("max-pool", "stride")


def _under_torch_func() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp) is running: there a layer's input shows one
    task's shape, not the size of the tensor computed."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)  # what autograd.Function.apply asks
    return True if active is None else active()


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that follows autocast under ``torch.func.vmap`` too: vmap's batching rule
    calls ``aten.convolution``, which autocast's lists miss (they name ``conv2d``), so a vectorized
    inner loop would otherwise convolve in float32 under ``precision="bf16"``.

    Under torch.func transforms (vectorized meta-learning), with :attr:`grouped_grads` set
    (:func:`use_grouped_conv_grads`), it convolves through
    :func:`bilevel_maml.grouped_conv.grouped_conv2d`: the same values and derivatives, but the double
    backward of per-task filters under vmap is a few grouped convolutions instead of one per task.
    Task by task there is no loop to remove, and PyTorch's convolution is used.
    """

    grouped_grads = False

    def _conv_forward(self, input, weight, bias):
        device = input.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            input, weight = input.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        if (self.grouped_grads and _under_torch_func() and self.padding_mode == "zeros"
                and not isinstance(self.padding, str) and input.dim() == 4):
            return grouped_conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


def use_grouped_conv_grads(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Compute the derivatives of ``model``'s convolutions (:class:`Conv2d` layers) under torch.func
    transforms as whole grouped convolutions (:mod:`bilevel_maml.grouped_conv`), or with PyTorch's own
    formulas. Same values and meta-gradients; fewer, larger convolutions in second-order vectorized
    meta-learning (off by default: on CPU it is no faster, and it has not run on a GPU yet).

    :param model: any module; its :class:`Conv2d` layers are switched.
    :param enabled: grouped derivatives on or off.
    :returns: ``model``.
    """
    for module in model.modules():
        if isinstance(module, Conv2d):
            module.grouped_grads = enabled
    return model


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose derivatives, when it normalises with batch statistics and keeps none
    (transductive), are computed in closed form by :func:`bilevel_maml.batch_norm.batch_norm`: the
    same values and derivatives, but second-order meta-gradients differentiate its backward with a few
    whole-tensor ops instead of PyTorch's ~90 per layer and inner step. On by default
    (:attr:`closed_form_grads`, :func:`use_closed_form_norm_grads`); a layer with running statistics
    computes as ``nn.BatchNorm2d``, and so does one outside torch.func transforms on an input of fewer
    than :attr:`closed_form_min_size` values (one task's small activation, task by task), where the
    closed form's Python per call costs more than the ops it saves.

    The parameters are ``nn.BatchNorm2d``'s:

    :param num_features: channels.
    :param eps: added to the variance.
    :param momentum: of the running statistics, if kept.
    :param affine: learn γ and β.
    :param track_running_stats: keep running statistics (False: transductive, the closed form applies).
    :param bias: learn β (with ``affine``).
    :param device: of the parameters.
    :param dtype: of the parameters.
    """

    closed_form_grads = True
    #: values of an input below which, outside torch.func transforms, PyTorch's derivatives are used
    closed_form_min_size = 100_000

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """:param input: ``(batch, channels, height, width)``."""
        if not (self.closed_form_grads and self.running_mean is None and self.running_var is None):
            return super().forward(input)
        if input.numel() < self.closed_form_min_size and not _under_torch_func():
            return super().forward(input)
        self._check_input_dim(input)
        if input.numel() == input.shape[1]:  # what F.batch_norm refuses in training
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}")
        return batch_norm(input, self.weight, self.bias, self.eps)


def use_closed_form_norm_grads(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Compute the derivatives of ``model``'s transductive :class:`BatchNorm2d` layers in closed form
    (:mod:`bilevel_maml.batch_norm`, the default) or with PyTorch's own formulas. Same values and
    meta-gradients; on this project's CPU, vectorized second-order MAML and iMAML meta-iterations are
    about 1.1× and 1.2× faster in closed form, with up to a quarter less peak memory (the docs'
    Results page).

    :param model: any module; its :class:`BatchNorm2d` layers are switched.
    :param enabled: closed-form derivatives on or off.
    :returns: ``model``.
    """
    for module in model.modules():
        if isinstance(module, BatchNorm2d):
            module.closed_form_grads = enabled
    return model


class ReLU(nn.ReLU):
    """``nn.ReLU`` computed, under torch.func transforms, by :func:`bilevel_maml.relu_and_max_pool.relu`:
    the same values and derivatives, without the zeros PyTorch's double backward materialises for
    the activation (one per layer and inner step of a second-order vectorized meta-iteration).

    :param inplace: as ``nn.ReLU``'s (an in-place ReLU computes as ``nn.ReLU``).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """:param input: any shape."""
        if _under_torch_func() and not self.inplace:
            return relu(input)
        return super().forward(input)


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` computed, under torch.func transforms, by
    :func:`bilevel_maml.relu_and_max_pool.max_pool2d`: the same values and derivatives, but under vmap
    the tasks are pooled where the convolution and BatchNorm before it left them (as channels), not
    copied into the batch dimension and back.

    The parameters are ``nn.MaxPool2d``'s:

    :param kernel_size: the window, an int or a pair.
    :param stride: the window's step (None: ``kernel_size``).
    :param padding: implicit −∞ padding on both sides.
    :param dilation: spacing of the window's elements.
    :param return_indices: also return the maxima's indices (computed as ``nn.MaxPool2d``).
    :param ceil_mode: round the output size up.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """:param input: ``(batch, channels, height, width)`` (any other input: ``nn.MaxPool2d``)."""
        if _under_torch_func() and input.dim() == 4 and not self.return_indices:
            return max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
        return super().forward(input)


class ConvBlock(nn.Sequential):
    """conv → BatchNorm → ReLU (→ 2×2 max-pool), one block of :class:`Conv4`.

    With max-pooling and transductive BatchNorm (no running statistics), the block can be computed
    in an order with the same result and a quarter of the element-wise work, forward and in every
    derivative: the batch statistics come from the convolution's output, but the normalisation and
    the ReLU run on the pooled quarter. This is exact because both are monotone per channel; a
    channel whose scale γ is negative is decreasing, so it is min-pooled instead.

    :param in_channels: input channels.
    :param out_channels: filters.
    :param transductive: BatchNorm keeps no running statistics (see :class:`Conv4`).
    :param downsample: ``"max-pool"`` or ``"stride"`` (see :class:`Conv4`).
    :param pool_before_norm: compute a max-pool block in the reordered way (off by default: on CPU it
        speeds up vectorized second-order MAML and iMAML but slows FOMAML and task-by-task MAML; see
        the docs' Results page).
        The plain order is used whatever this says when a layer of the block was replaced or
        carries a hook, or the BatchNorm keeps running statistics.
    """

    def __init__(self, in_channels: int, out_channels: int, transductive: bool = True,
                 downsample: str = "max-pool", pool_before_norm: bool = False):
        stride = 2 if downsample == "stride" else 1
        layers = [Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1),
                  BatchNorm2d(out_channels, track_running_stats=not transductive),
                  ReLU()]
        if downsample == "max-pool":
            layers.append(MaxPool2d(2))
        super().__init__(*layers)
        self.pool_before_norm = pool_before_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: ``(batch, in_channels, height, width)``."""
        if not self._reorders():
            return super().forward(x)
        conv, norm = self[0], self[1]
        # flip the channels with γ < 0 inside the convolution (on its small weight, not on the
        # activation): max-pooling the flipped channel is min-pooling the channel itself
        if norm.weight is None:
            flipped = conv._conv_forward(x, conv.weight, conv.bias)
        else:
            sign = torch.where(norm.weight >= 0, 1.0, -1.0).to(norm.weight.dtype)
            flipped = conv._conv_forward(x, conv.weight * sign.view(-1, 1, 1, 1),
                                         None if conv.bias is None else conv.bias * sign)
        # statistics in float32 at least, as BatchNorm keeps them under autocast
        var, mean = torch.var_mean(flipped if flipped.dtype in (torch.float32, torch.float64) else flipped.float(),
                                   dim=(0, 2, 3), unbiased=False)
        scale = torch.rsqrt(var + norm.eps)
        if norm.weight is not None:
            scale = scale * (norm.weight * sign)  # |γ|, with BatchNorm's derivative at γ = 0
        out = (F.max_pool2d(flipped, 2) - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)
        if norm.bias is not None:
            out = out + norm.bias.view(1, -1, 1, 1)
        return torch.relu(out)

    def _reorders(self) -> bool:
        if not self.pool_before_norm or len(self) != 4:
            return False
        conv, norm, relu, pool = self
        plain = (isinstance(conv, nn.Conv2d) and type(norm) in (nn.BatchNorm2d, BatchNorm2d) and norm.running_mean is None and type(relu) in (nn.ReLU, ReLU)
                 and type(pool) in (nn.MaxPool2d, MaxPool2d) and pool.kernel_size in (2, (2, 2))
                 and pool.stride in (2, (2, 2)) and pool.padding in (0, (0, 0)) and pool.dilation in (1, (1, 1))
                 and not pool.ceil_mode)
        # a hook on a layer this order skips (or calls other than through its forward) would not run
        hooked = any(m._forward_hooks or m._forward_pre_hooks for m in self)
        return plain and not hooked


class Conv4(nn.Module):
    """Four 3×3 conv–BN–ReLU–max-pool blocks and a linear classifier (Vinyals et al.; Finn et al.).

    ``Conv4(ways, in_channels=1, hidden=64, image_size=28)`` is the Omniglot network;
    ``Conv4(ways, in_channels=3, hidden=32, image_size=84)`` the mini-ImageNet one.
    ``downsample="stride"`` is Finn et al.'s Omniglot variant (learn2learn's ``OmniglotCNN``):
    stride-2 convolutions instead of max-pooling, then the mean over the positions left.

    :param ways: classes (the classifier's outputs).
    :param in_channels: image channels.
    :param hidden: filters of every conv layer.
    :param image_size: image side in pixels (sets the classifier's input size).
    :param transductive: BatchNorm keeps no running statistics and normalises with the batch's in training and
        evaluation alike (MAML's convention).
    :param downsample: ``"max-pool"`` (Vinyals et al.) or ``"stride"`` (stride-2 convolutions, Finn et al.'s Omniglot network).
    :param pool_before_norm: how max-pool blocks are computed (the same function either way; see
        :class:`ConvBlock`).
    :param grouped_conv_grads: how the convolutions' derivatives are computed (the same values either
        way; see :func:`use_grouped_conv_grads`).
    :param closed_form_norm_grads: how the BatchNorm layers' derivatives are computed (the same values
        either way; see :func:`use_closed_form_norm_grads`).
    """

    def __init__(self, ways: int, in_channels: int = 1, hidden: int = 64, image_size: int = 28,
                 transductive: bool = True, downsample: str = "max-pool", pool_before_norm: bool = False,
                 grouped_conv_grads: bool = False, closed_form_norm_grads: bool = True):
        super().__init__()
        if downsample not in DOWNSAMPLING:
            raise ValueError(f"downsample={downsample!r}; choose one of: {', '.join(DOWNSAMPLING)}")
        self.downsample = downsample
        channels = [in_channels, hidden, hidden, hidden, hidden]
        self.features = nn.Sequential(
            *(ConvBlock(a, b, transductive, downsample, pool_before_norm) for a, b in zip(channels, channels[1:]))
        )
        side = image_size // 2**4  # after four 2×2 max-pools
        self.classifier = nn.Linear(hidden if downsample == "stride" else hidden * side * side, ways)
        use_grouped_conv_grads(self, grouped_conv_grads)
        use_closed_form_norm_grads(self, closed_form_norm_grads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: images ``(batch, in_channels, image_size, image_size)``.
        :returns: class scores ``(batch, ways)``.
        """
        x = self.features(x)
        return self.classifier(x.mean(dim=(2, 3)) if self.downsample == "stride" else x.flatten(1))


class MLP(nn.Module):
    """Fully connected ReLU network; ``MLP(1, 1, (40, 40))`` is the MAML sinusoid regressor.

    :param in_features: input features.
    :param out_features: outputs.
    :param hidden: widths of the hidden layers.
    """

    def __init__(self, in_features: int = 1, out_features: int = 1, hidden: Sequence[int] = (40, 40)):
        super().__init__()
        sizes = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes, sizes[1:]):
            layers += [nn.Linear(a, b), ReLU()]
        layers.append(nn.Linear(sizes[-1], out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: inputs ``(batch, in_features)``.
        """
        return self.net(x)


class _ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, transductive: bool):
        super().__init__()

        def norm():
            return BatchNorm2d(out_channels, track_running_stats=not transductive)

        self.body = nn.Sequential(
            Conv2d(in_channels, out_channels, 3, padding=1, bias=False), norm(), nn.LeakyReLU(0.1),
            Conv2d(out_channels, out_channels, 3, padding=1, bias=False), norm(), nn.LeakyReLU(0.1),
            Conv2d(out_channels, out_channels, 3, padding=1, bias=False), norm(),
        )
        self.shortcut = nn.Sequential(Conv2d(in_channels, out_channels, 1, bias=False), norm())
        self.out = nn.Sequential(nn.LeakyReLU(0.1), MaxPool2d(2))

    def forward(self, x):
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(nn.Module):
    """ResNet-12 (Oreshkin et al. 2018; Lee et al. 2019): four residual blocks of three 3×3 convs,
    each followed by 2×2 max-pooling, global average pooling and a linear classifier.

    ``channels=(64, 160, 320, 640)`` is the MetaOptNet width; narrower tuples make it CPU-friendly.

    :param ways: classes (the classifier's outputs).
    :param in_channels: image channels.
    :param channels: output channels of the four residual stages.
    :param transductive: BatchNorm keeps no running statistics and normalises with the batch's (as in Conv4).
    """

    def __init__(self, ways: int, in_channels: int = 3, channels: Sequence[int] = (64, 160, 320, 640),
                 transductive: bool = True):
        super().__init__()
        widths = [in_channels, *channels]
        self.features = nn.Sequential(
            *(_ResidualBlock(a, b, transductive) for a, b in zip(widths, widths[1:])),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(widths[-1], ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: images ``(batch, in_channels, height, width)``.
        :returns: class scores ``(batch, ways)``.
        """
        return self.classifier(self.features(x).flatten(1))


MODELS = ("conv4", "conv4-strided", "resnet12", "mlp")

#: networks of users' own, by name (:func:`register_model`): selectable like the built-in :data:`MODELS`
REGISTERED_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make a network of your own selectable by name: in :func:`build_model` and with ``--model
    NAME`` on the command line, from a module loaded with ``--plugin`` (which the run's config
    records, so ``evaluate`` and ``resume`` build it again).

    :param name: the name (case-insensitive). A built-in name is refused, and so is one registered
        with another factory; the same factory defined again (a reloaded module) replaces the old one.
    :param factory: returns the ``nn.Module``. It is called with those of these keywords its
        signature names (all of them if it takes ``**kwargs``): ``ways`` (outputs: the classes, 1
        for regression), ``in_channels`` and ``image_size`` (None for vector inputs such as
        sinusoid's), ``in_features`` (one input's size, flattened: 1 for sinusoid, C·H·W for
        images) and ``width`` (``--width``; None when not given). Inputs reach the model as the
        dataset gives them: ``(N, 1)`` points, ``(N, C, H, W)`` images.
    """
    if isinstance(factory, nn.Module):  # callable too, but a run builds its network anew (evaluate, resume)
        raise TypeError(f"register_model needs a function that builds the network, got a {type(factory).__name__} "
                        f"already built; pass e.g. lambda ways, **given: {type(factory).__name__}(...)")
    if not callable(factory):
        raise TypeError(f"register_model needs a callable that returns an nn.Module, got {factory!r}")
    key = name.lower()
    refuse_taken_name("model", key, MODELS, REGISTERED_MODELS.get(key), factory, "your network")
    REGISTERED_MODELS[key] = factory


def known_models() -> list[str]:
    """The built-in :data:`MODELS`, then the names :func:`register_model` registered."""
    return [*MODELS, *sorted(REGISTERED_MODELS)]


def build_model(name: str, ways: int, in_channels: int | None = 1, image_size: int | None = 28,
                width: int | None = None, in_features: int = 1) -> nn.Module:
    """A backbone by name: ``conv4`` (``width`` filters, default 64; ``conv4-strided`` is Finn et al.'s
    Omniglot variant with stride-2 convolutions instead of max-pooling), ``resnet12`` (``width`` is the
    first stage's channels, default 64, then ×2.5, ×5, ×10), ``mlp`` (two hidden layers of
    ``width``, default 40; ``ways`` outputs, or 1 for regression), or a name :func:`register_model`
    registered (its factory gets these arguments as keywords).

    :param name: one of :func:`known_models`.
    :param ways: outputs (classes; 1 for sinusoid regression).
    :param in_channels: image channels (None: vector inputs; a registered model's factory sees it).
    :param image_size: image side in pixels (None: vector inputs; likewise).
    :param width: see above (None: the default width).
    :param in_features: one input's size, flattened (the MLP's input features).
    """
    check_positive_int("ways", ways)
    if width is not None:
        check_positive_int("width", width)
    factory = REGISTERED_MODELS.get(name.lower())
    if factory is not None:
        return _from_factory(name.lower(), factory, ways=ways, in_channels=in_channels, image_size=image_size,
                             in_features=in_features, width=width)
    check_positive_int("in_channels", in_channels)
    if name in ("conv4", "conv4-strided"):
        return Conv4(ways, in_channels=in_channels, hidden=width or 64, image_size=image_size,
                     downsample="stride" if name == "conv4-strided" else "max-pool")
    if name == "resnet12":
        base = width or 64
        return ResNet12(ways, in_channels, channels=(base, base * 5 // 2, base * 5, base * 10))
    if name == "mlp":
        hidden = width or 40
        return MLP(in_features, ways, (hidden, hidden))
    raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(known_models())}")


def _from_factory(name: str, factory: Callable[..., nn.Module], **given) -> nn.Module:
    model = call_with_named_keywords(factory, **given)
    if not isinstance(model, nn.Module):
        raise TypeError(f"the factory of model {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


__all__ = ["MODELS", "REGISTERED_MODELS", "BatchNorm2d", "Conv4", "ConvBlock", "ResNet12", "MLP", "build_model",
           "known_models", "register_model", "use_closed_form_norm_grads", "use_grouped_conv_grads"]
