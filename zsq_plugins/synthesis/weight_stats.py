"""Statistics targets derived from the weights alone, for models without BatchNorm.

After GZSQ's idea (data distilled from the pretrained weights). Each tensor's channels are
propagated as Gaussians with a per-channel mean and variance, starting from a standardized
input (mean 0, variance 1 per channel, in the model's normalized space), through the
BN-folded graph:

- conv, output channel o, with S[o,i] = sum_k W[o,i,k] (the channel's weight sum over its
  kernel window):  E[y_o] = b_o + sum_i S[o,i] E[x_i],  Var[y_o] = sum_i S[o,i]^2 Var[x_i].
  The variance assumes each input channel is smooth across a kernel window (fully correlated
  there, as natural images and their feature maps are) and channels independent. Assuming
  every position independent instead (sum of W^2) made the predicted standard deviation of a
  trained VGG's deep layers 20-100x smaller than on real data;
- linear: E[y] = b + W E[x], Var[y] = W^2 Var[x] (features independent);
- ReLU / ReLU6 / Hardtanh: exact moments of a Gaussian clamped to [low, high];
- max pooling over n values: mean and variance of the maximum of n independent Gaussians;
  average pooling (and a spatial mean): mean kept, variance divided by n; addition and
  subtraction: means add (subtract), variances add; flatten repeats each channel's moments;
- GELU, SiLU, Hardswish, sigmoid, tanh and the other elementwise activations: Gauss-Hermite
  moments (moments.py); a product of tensors as independent factors; concatenation along
  channels joins their moments;
- LayerNorm, GroupNorm, permutes, reshapes and attention: propagation.py, which tracks the
  axis channels lie on (channel-last blocks, tokens) and states its approximations.
An operation without a rule passes its input's moments on unchanged, with a warning, when it
keeps the channels (refused with ``strict``, and always where the channels change).

The predicted mean and standard deviation of every conv/linear output are targets the engine
matches (``SynthesisConfig(statistics="weights")``), read at that layer's output, or at its
BatchNorm's output when BN follows; the ``weight-stats`` preset uses them. Measured on
vgg_nobn_fmnist, the means follow real data closely while deep layers' variances are
underestimated (channels are correlated, and the rule takes them as independent).
"""

from __future__ import annotations

from torch import nn

from zsq_plugins.quant.fold import fold_batchnorm, trace
from zsq_plugins.synthesis.hooks import StatisticsTarget
from zsq_plugins.synthesis.moments import clamped_gaussian, max_of_gaussians
from zsq_plugins.synthesis.propagation import Propagation, propagate

__all__ = ["clamped_gaussian", "max_of_gaussians", "propagate", "weight_statistics_targets"]


def weight_statistics_targets(
    model: nn.Module, input_shape: tuple[int, ...], strict: bool = False
) -> list[StatisticsTarget]:
    """Targets for every conv/linear output of ``model``, derived from its weights.

    Computed on the BN-folded graph; a layer followed by BatchNorm is read at the BN's output
    (the folded conv's output), so the rule also runs on BN models, ignoring their BN statistics.
    """
    propagation = Propagation(fold_batchnorm(model).cpu(), strict)
    predicted = propagation.run(input_shape)
    original = trace(model)
    modules = dict(model.named_modules())
    read_at_batchnorm = {}
    for node in original.graph.nodes:
        users = list(node.users)
        if (
            node.op == "call_module"
            and len(users) == 1
            and users[0].op == "call_module"
            and isinstance(modules[users[0].target], nn.modules.batchnorm._BatchNorm)
        ):
            read_at_batchnorm[node.target] = users[0].target
    targets = []
    for name, (mean, var) in predicted.items():  # layers inside leaf modules too
        read_at = read_at_batchnorm.get(name, name)
        device = modules[read_at].weight.device if hasattr(modules[read_at], "weight") else None
        targets.append(
            StatisticsTarget(
                name,
                modules[read_at],
                mean.to(device),
                var.clamp_min(1e-10).sqrt().to(device),
                on_output=True,
                channel_axis=propagation.axes[name],
            )
        )
    return targets
