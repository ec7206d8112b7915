"""Dynamic residual convolution (DMF: Yun & Ro, "Dynamic Mobile-Former", Eq. 2 and Fig. 3).

Per sample ``n``, with the pooled input ``GAP(x_n)`` and a conditioning token ``z_n`` (DMF's first global token)::

    pi_n   = sigmoid( net2( ReLU( BN( net1( [z_n ; GAP(x_n)] ) ) ) ) / T )        # (K,), Fig. 3 ("AFKA")
    W_n    = W_agn + s * sum_k pi_nk W_k                                            # Eq. 2 ("RCKS")
    y_n    = conv(x_n, W_n)

* ``W_agn`` (``static_weight``) is the input-agnostic kernel, ``kaiming_uniform_`` initialised (the paper says
  "random"; the authors' code uses PyTorch's default ``kaiming_uniform_``, i.e. bound ``sqrt(6 / fan_in)``).
* ``W_k`` (``weight``, the core's kernel bank ``(K, C_out, C_in/g, kh, kw)``) are the input-dependent experts, zero
  initialised (paper Table 7), so at init the layer is the plain conv ``W_agn``.
* ``s = 0.1`` (``expert_scale``) is not in the paper; the authors' code scales the experts by 0.1 before mixing and
  their checkpoints need it. It is applied to the attention (``s * pi`` multiplies the bank in the core's
  aggregation), in the training and the inference form alike: there is nothing to fold.
* The concatenation order is token first, then the pooled input (authors' code); the hidden width is the token
  width (192 in DMF), not a reduction of ``C_in``; both 1x1 convs have no bias; sigmoid, not softmax (Table 6).
* The temperature ``T`` (a :class:`~dynzoo.layers.heads.TemperatureMixin` buffer, role ``'kernel'``) divides the
  logits before the sigmoid; DMF anneals it 30 -> 1 over the first 10 epochs
  (:func:`~dynzoo.layers.temperature.linear_temperature`) and runs inference at 1.
* Batch size 1 in training: the attention's BatchNorm sees one value per channel (pooled ``(1, C, 1, 1)``), on
  which batch statistics do not exist (the authors' code fails there). It is a
  :class:`~dynzoo.layers.heads.PooledBatchNorm2d`, which normalises such a batch with its running statistics and
  leaves them untouched (``single_sample_bn='running'``, default); ``'error'`` raises instead, naming the fix
  (batch >= 2, or SyncBatchNorm across devices).

The execution (grouped per-sample kernels, dense-K mixing, ...) is the shared core's
:func:`~dynzoo.layers.dynamic.dynamic_conv2d`; the agnostic kernel is the core's ``static_weight`` and the token its
conditioning tensor. The inference form (``inference_mode=True``, or :meth:`DRKernelAttention.reparameterize`) folds
the attention's BatchNorm into ``net1``.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import register_notrace_module, to_2tuple

from .dynamic import DynamicAttention, DynamicConv2dBase
from .fusion import fuse_conv_bn, is_batchnorm
from .heads import PooledBatchNorm2d
from .temperature import TemperatureMixin

__all__ = ['DRKernelAttention', 'DynamicResidualConv2d']


@register_notrace_module
class DRKernelAttention(nn.Module, TemperatureMixin):
    """DMF kernel attention (Fig. 3): ``pi = gate(net2(ReLU(BN(net1([z ; GAP x])))) / T)`` -> ``(B, K)``.

    ``token_dim=0`` drops the token input (the paper's "AFKA off" ablation, Table 3); its hidden width is then not
    given by the paper: ``hidden_channels`` must be set (30 reproduces Table 3's parameter count: dynzoo's choice).
    ``inference_mode=True``: ``net1`` with a bias and no ``bn`` (what :meth:`reparameterize` leaves).
    """

    def __init__(
            self,
            in_channels: int,
            num_kernels: int = 8,
            token_dim: int = 192,
            hidden_channels: Optional[int] = None,
            temperature: float = 1.0,
            gate: str = 'sigmoid',
            single_sample_bn: str = 'running',
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if gate not in ('sigmoid', 'softmax'):
            raise ValueError(f"gate must be 'sigmoid' or 'softmax', got {gate!r}")
        if token_dim < 0:
            raise ValueError(f'token_dim must be >= 0, got {token_dim}')
        if hidden_channels is None:
            if token_dim == 0:
                raise ValueError('hidden_channels is required when token_dim=0 (no token to set the hidden width)')
            hidden_channels = token_dim
        self.in_channels = in_channels
        self.token_dim = token_dim
        self.num_kernels = num_kernels
        self.softmax_gate = gate == 'softmax'
        self._init_temperature(temperature, 'kernel', device=device)
        self.net1 = nn.Conv2d(token_dim + in_channels, hidden_channels, 1, bias=inference_mode, **dd)
        self.bn = nn.Identity() if inference_mode else PooledBatchNorm2d(
            hidden_channels, single_sample=single_sample_bn, **dd)
        self.net2 = nn.Conv2d(hidden_channels, num_kernels, 1, bias=False, **dd)
        for m in (self.net1, self.net2):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

    def forward(self, pooled: torch.Tensor, token: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``pooled`` ``(B, C_in, 1, 1)``, ``token`` ``(B, token_dim)`` -> attention ``(B, K)`` in ``[0, 1]``."""
        batch = pooled.shape[0]
        if self.token_dim > 0:
            if token is None:
                raise ValueError(
                    f'this kernel attention is conditioned on a token ({batch}, {self.token_dim}); got None')
            if not torch.jit.is_scripting():
                self._check_token_eager(token, batch)
            a = torch.cat([token.reshape(batch, self.token_dim, 1, 1).to(pooled.dtype), pooled], dim=1)
        else:
            a = pooled
        h = F.relu(self.bn(self.net1(a)))
        logits = self.net2(h).flatten(1) / self.temperature
        if self.softmax_gate:
            return torch.softmax(logits, dim=1)
        return torch.sigmoid(logits)

    @torch.jit.unused
    def _check_token_eager(self, token: torch.Tensor, batch: int) -> None:
        if token.dim() != 2 or token.shape[0] != batch or token.shape[1] != self.token_dim:
            raise ValueError(f'token must have shape ({batch}, {self.token_dim}), got {tuple(token.shape)}')

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the BatchNorm into ``net1`` (which gains a bias); exact, from the running statistics, any mode."""
        if is_batchnorm(self.bn):
            self.net1 = fuse_conv_bn(self.net1, self.bn)
            self.bn = nn.Identity()


@register_notrace_module
class DynamicResidualConv2d(DynamicConv2dBase):
    """DMF's dynamic residual convolution ("DYR-conv": DYN-gconv, DYN-dwconv, DYR-1x1conv), ``forward(x, token)``.

    Geometry follows ``nn.Conv2d`` (``padding=None`` means ``dilation * (k - 1) // 2``); grouped (``groups=g``),
    depthwise (``groups = C_in = C_out``, see :meth:`depthwise`) and point-wise (``kernel_size=1``, see
    :meth:`pointwise`) forms. No bias (DMF's convs have none). Args beyond ``nn.Conv2d``:

    * ``num_kernels`` K experts (DMF: 8), ``token_dim`` width of the conditioning token (DMF: 192; 0 disables it),
      ``attn_hidden`` hidden width of the attention (default ``token_dim``);
    * ``expert_scale`` the authors' fixed 0.1 on the expert sum (default; 1 without ``W_agn``);
      ``agnostic_kernel=False`` drops ``W_agn`` and initialises the experts like DynamicConv instead of with zeros
      (the paper's "RCKS off", Table 3: plain dynamic conv with sigmoid attention);
    * ``temperature`` (1 = inference), ``gate`` ``'sigmoid'`` (paper) or ``'softmax'`` (Table 6 ablation),
      ``single_sample_bn`` see :class:`~dynzoo.layers.heads.PooledBatchNorm2d`, ``strategy`` the core's execution
      strategy;
    * ``inference_mode`` the attention in its folded form (:meth:`DRKernelAttention.reparameterize`), ``post_bias``
      see :class:`~dynzoo.layers.dynamic.DynamicConv2dBase`.
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size,
            stride=1,
            padding=None,
            dilation=1,
            groups: int = 1,
            num_kernels: int = 8,
            token_dim: int = 192,
            attn_hidden: Optional[int] = None,
            expert_scale: Optional[float] = None,
            agnostic_kernel: bool = True,
            temperature: float = 1.0,
            gate: str = 'sigmoid',
            single_sample_bn: str = 'running',
            strategy: str = 'auto',
            padding_mode: str = 'zeros',
            inference_mode: bool = False,
            post_bias: bool = False,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        if padding is None:
            k = to_2tuple(kernel_size)
            d = to_2tuple(dilation)
            padding = (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
        super().__init__(
            in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride,
            padding=padding, dilation=dilation, groups=groups, bias=False, num_kernels=num_kernels,
            static_kernel=agnostic_kernel, post_bias=post_bias, strategy=strategy, padding_mode=padding_mode, **dd)
        if expert_scale is None:
            expert_scale = 0.1 if agnostic_kernel else 1.0
        self.expert_scale = float(expert_scale)
        self.kernel_attention = DRKernelAttention(
            in_channels, num_kernels, token_dim, attn_hidden, temperature, gate, single_sample_bn,
            inference_mode=inference_mode, **dd)

    @classmethod
    def pointwise(cls, in_channels: int, out_channels: int, groups: int = 1, **kwargs) -> 'DynamicResidualConv2d':
        """The (grouped) 1x1 form: DMF's DYR-1x1conv / DYN-gconv."""
        return cls(in_channels, out_channels, 1, groups=groups, **kwargs)

    @classmethod
    def depthwise(cls, channels: int, kernel_size=3, **kwargs) -> 'DynamicResidualConv2d':
        """The depthwise form (``groups = C_in = C_out``): DMF's DYN-dwconv."""
        return cls(channels, channels, kernel_size, groups=channels, **kwargs)

    def reset_bank_parameters(self) -> None:
        """Experts zero (paper Table 7) and ``W_agn`` ``kaiming_uniform_``; without ``W_agn`` the DynamicConv init."""
        if self.static_weight is None:
            super().reset_bank_parameters()
            return
        nn.init.zeros_(self.weight)
        nn.init.kaiming_uniform_(self.static_weight)

    def forward_attention(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None) -> DynamicAttention:
        """``s * pi`` ``(B, K)``, ``s`` the expert scale; ``cond`` is the token ``(B, token_dim)``."""
        pooled = x.mean((2, 3), keepdim=True)
        pi = self.kernel_attention(pooled, cond)
        if self.expert_scale != 1.0:
            pi = pi * self.expert_scale
        return DynamicAttention(pi, None, None, None)

    @torch.no_grad()
    def set_temperature(self, temperature: float) -> None:
        self.kernel_attention.set_temperature(temperature)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.static_weight is None:
            s += ', agnostic_kernel=False'
        if self.expert_scale != 1.0:
            s += f', expert_scale={self.expert_scale}'
        return s
