"""ATConv: Attentive Convolution (Yu et al., "Attentive Convolution: Unifying the Expressivity of Self-Attention
with Convolutional Efficiency", arXiv:2510.20092).

A token mixer ``Out = W_out (alpha(X) * W_value X)``: a depthwise ``K x K`` convolution whose kernel is made per
sample and per channel from the global context and is the same at every position (paper Alg. 1):

* Context-to-Kernel translation, Eq. (7): ``F = Conv1x1(X)``, ``Z = Pool_{K^2}(F)``, ``K = W_gen GELU(Z)`` with one
  ``K^2 -> K^2`` generator shared by all channels (``kernel_proj``, ``kernel_gen``);
* Differential Kernel Modulation (lateral inhibition), Eq. (8): ``alpha = K - sigmoid(gamma_c) mean_uv(K)``
  (``difference_control`` = gamma, zero-initialised so lambda = 0.5);
* value projection, Eq. (10) (``x_proj``), the dynamic depthwise conv, Eq. (11) (cross-correlation, zero padding
  ``K // 2``, stride 1, no kernel flip), and the output projection ``W_out`` (``proj``).

Decisions the paper leaves open (dynzoo's choices, after the authors' code):

* ``pool_mode='1d'`` (default) is the authors' code: ``F`` is flattened row-major to ``(B, C, H*W)`` and
  ``AdaptiveAvgPool1d(K^2)`` averages 9 horizontal bands, *not* a 3x3 grid. Their weights need it.
  ``pool_mode='2d'`` is the paper's text (``AdaAvgPool_{KxK}``, then row-major ``Vec``). Same parameters.
* Tap order ``t = u * K + v`` (row offset ``u``, column offset ``v``), as the code reshapes.
* GELU is exact (erf); no softmax, no kernel normalisation beyond DKM, no heads or groups.
* Parameters ``3C^2 + 4C + K^4 + K^2`` (three biased 1x1 convs, the generator, gamma).

Execution: the per-sample depthwise conv runs through the core's
:func:`dynzoo.layers.per_sample.per_sample_depthwise_conv2d` (strategies ``grouped`` / ``shift`` / ``gemm`` /
``loop``; ``auto`` is ``grouped``, ``gemm`` while exporting; measured in ``docs/performance.md``).

Inference form (:meth:`ATConv2d.reparameterize`, or ``inference_mode=True``): pooling and a 1x1 conv are both
linear, so ``Pool(W X + b) = W Pool(X) + b`` exactly; the inference form pools ``X`` first and applies the
projection to the ``(B, C, K^2)`` context (``context_proj``, an ``nn.Conv1d`` holding ``kernel_proj``'s weights),
cutting that branch from ``C^2 H W`` to ``C^2 K^2`` MACs. The training form keeps ``kernel_proj`` before the
pooling, whose FLOPs are the paper's.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import register_notrace_module, trunc_normal_

from .per_sample import DEPTHWISE_STRATEGIES, per_sample_depthwise_conv2d

__all__ = ['ATConv2d', 'ATCONV_POOL_MODES', 'atconv_num_params', 'adaptive_pool_matrix']

ATCONV_POOL_MODES = ('1d', '2d')


def atconv_num_params(dim: int, kernel_size: int = 3, bias: bool = True) -> int:
    """Closed-form parameter count of one :class:`ATConv2d`: ``3C^2 + 4C + K^4 + K^2`` with biases (three 1x1
    convs, the generator, gamma)."""
    k2 = kernel_size * kernel_size
    return 3 * dim * dim + (3 * dim if bias else 0) + dim + k2 * k2 + k2


@torch.jit.unused
def _onnx_exporting() -> bool:
    return torch.onnx.is_in_onnx_export()


def adaptive_pool_matrix(length: int, bins: int, like: torch.Tensor) -> torch.Tensor:
    """``(length, bins)`` averaging matrix of PyTorch's adaptive average pooling: bin ``j`` averages indices
    ``[floor(j L / n), ceil((j + 1) L / n))`` (used only while exporting to ONNX)."""
    idx = torch.arange(length, device=like.device).unsqueeze(1)
    j = torch.arange(bins, device=like.device).unsqueeze(0)
    start = torch.div(j * length, bins, rounding_mode='floor')
    end = torch.div((j + 1) * length + bins - 1, bins, rounding_mode='floor')
    member = ((idx >= start) & (idx < end)).to(like.dtype)
    return member / member.sum(0, keepdim=True)


@register_notrace_module
class ATConv2d(nn.Module):
    """Attentive convolution over ``(B, C, H, W)`` feature maps (paper Alg. 1).

    Args:
        dim: channels ``C`` (input = output).
        kernel_size: ``K`` (odd; paper: 3 everywhere, 5 / 7 in the Tab. IX(a) ablation).
        pool_mode: ``'1d'`` authors' band pooling (default, needed by their weights) or ``'2d'`` paper's grid.
        bias: biases of the three 1x1 convs (the generator always has one, as in the authors' code).
        strategy: per-sample depthwise execution strategy (``'auto'``, ``'grouped'``, ``'shift'``, ``'gemm'``,
            ``'loop'``).
        inference_mode: build the pool-first inference form (``context_proj``; what :meth:`reparameterize` leaves).
    """

    def __init__(
            self,
            dim: int,
            kernel_size: int = 3,
            pool_mode: str = '1d',
            bias: bool = True,
            strategy: str = 'auto',
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if dim < 1:
            raise ValueError(f'ATConv2d needs dim >= 1, got {dim}')
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f'ATConv2d needs an odd kernel_size >= 1 (zero padding K // 2 keeps H, W), got {kernel_size}')
        if pool_mode not in ATCONV_POOL_MODES:
            raise ValueError(f'Unknown ATConv pool_mode {pool_mode!r}; expected one of {ATCONV_POOL_MODES}')
        if strategy not in DEPTHWISE_STRATEGIES:
            raise ValueError(f'Unknown depthwise strategy {strategy!r}; expected one of {DEPTHWISE_STRATEGIES}')
        dd = {'device': device, 'dtype': dtype}
        self.dim = dim
        self.kernel_size = kernel_size
        self.pool_mode = pool_mode
        self.strategy = strategy
        k2 = kernel_size * kernel_size
        # C2K Conv1x1, Eq. (7): on X (training form) or, as a Conv1d, on the pooled context (inference form)
        # both slots are registered in both forms, so the two forms list their modules in the same order
        self.register_module('kernel_proj', None if inference_mode else nn.Conv2d(dim, dim, 1, bias=bias, **dd))
        self.register_module('context_proj', nn.Conv1d(dim, dim, 1, bias=bias, **dd) if inference_mode else None)
        self.kernel_gen = nn.Linear(k2, k2, **dd)  # W_gen, shared by all channels
        self.x_proj = nn.Conv2d(dim, dim, 1, bias=bias, **dd)  # W_value, Eq. (10)
        self.proj = nn.Conv2d(dim, dim, 1, bias=bias, **dd)  # W_out
        self.difference_control = nn.Parameter(torch.empty(dim, **dd))  # gamma of DKM, Eq. (8)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Authors' init: trunc-normal(0.02) weights, zero biases, gamma = 0 (lambda = 0.5)."""
        for m in (self.kernel_proj, self.context_proj, self.kernel_gen, self.x_proj, self.proj):
            if m is None:
                continue
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.difference_control)

    def _pool(self, f: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, K^2)``: 9 row-major bands ('1d') or a ``K x K`` grid, flattened ('2d')."""
        k = self.kernel_size
        if not torch.jit.is_scripting() and _onnx_exporting():
            # ONNX has no adaptive pooling with non-dividing sizes: the same bins as averaging matrices
            if self.pool_mode == '1d':
                return torch.matmul(f.flatten(2), adaptive_pool_matrix(f.shape[2] * f.shape[3], k * k, f))
            z = torch.matmul(adaptive_pool_matrix(f.shape[2], k, f).t(), f)  # (B, C, K, W)
            return torch.matmul(z, adaptive_pool_matrix(f.shape[3], k, f)).flatten(2)
        if self.pool_mode == '1d':
            return F.adaptive_avg_pool1d(f.flatten(2), k * k)
        return F.adaptive_avg_pool2d(f, k).flatten(2)

    def forward_context(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled context ``Z = Pool_{K^2}(Conv1x1(X))`` ``(B, C, K^2)``, Eq. (7)."""
        if self.context_proj is not None:  # the projection on the pooled (B, C, K^2) map: exact by linearity
            return self.context_proj(self._pool(x))
        if self.kernel_proj is not None:
            return self._pool(self.kernel_proj(x))
        raise RuntimeError('ATConv2d has neither kernel_proj nor context_proj')

    def forward_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The modulated per-sample, per-channel kernel ``alpha`` ``(B, C, K, K)``, Eqs. (7)-(8)."""
        batch = x.shape[0]
        k = self.kernel_size
        kernel = self.kernel_gen(F.gelu(self.forward_context(x)))  # (B, C, K^2), tap t = u * K + v
        mean = kernel.mean(dim=2, keepdim=True)  # K-bar, (B, C, 1)
        lam = torch.sigmoid(self.difference_control).view(1, -1, 1)
        alpha = kernel - lam * mean
        return alpha.reshape(batch, self.dim, k, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f'ATConv2d expects a 4-D input (B, C, H, W), got {x.dim()} dims (shape {x.shape})')
        if x.shape[1] != self.dim:
            raise ValueError(f'ATConv2d expects {self.dim} input channels, got {x.shape[1]} (shape {x.shape})')
        alpha = self.forward_kernel(x)
        value = self.x_proj(x)
        pad = self.kernel_size // 2
        y = per_sample_depthwise_conv2d(value, alpha, (pad, pad), self.strategy)  # Eq. (11)
        return self.proj(y)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Switch to the pool-first inference form (exact; see the module docstring)."""
        conv = self.kernel_proj
        if conv is None:
            return
        proj = nn.Conv1d(self.dim, self.dim, 1, bias=conv.bias is not None, device=conv.weight.device,
                         dtype=conv.weight.dtype)
        proj.weight.copy_(conv.weight[:, :, :, 0])
        if conv.bias is not None:
            proj.bias.copy_(conv.bias)
        self.context_proj = proj.train(conv.training)
        self.kernel_proj = None

    def extra_repr(self) -> str:
        s = f'{self.dim}, kernel_size={self.kernel_size}, pool_mode={self.pool_mode!r}'
        if self.strategy != 'auto':
            s += f', strategy={self.strategy!r}'
        return s
