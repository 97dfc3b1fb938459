"""Models written the way public time-series, EEG, speech and tabular code writes them.

Each entry of ``CASES`` is (name, factory, example-input builder, construct). The
``forward`` methods keep the habits of such code: buffers allocated then moved with
``.to(...)``, ``individual`` flags, ``nn.Flatten`` modules, optional ``None`` arguments,
dict outputs, loops over ``range(self.n)`` with writes into preallocated tensors.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------- 1. preallocated buffers

class MovingAvg(nn.Module):
    """Moving average block to highlight the trend of time series."""

    def __init__(self, kernel_size, stride):
        super(MovingAvg, self).__init__()
        self.kernel_size = kernel_size
        self.avg = nn.AvgPool1d(kernel_size=kernel_size, stride=stride, padding=0)

    def forward(self, x):
        # padding on the both ends of time series
        front = x[:, 0:1, :].repeat(1, (self.kernel_size - 1) // 2, 1)
        end = x[:, -1:, :].repeat(1, (self.kernel_size - 1) // 2, 1)
        x = torch.cat([front, x, end], dim=1)
        x = self.avg(x.permute(0, 2, 1))
        x = x.permute(0, 2, 1)
        return x


class SeriesDecomp(nn.Module):
    def __init__(self, kernel_size):
        super(SeriesDecomp, self).__init__()
        self.moving_avg = MovingAvg(kernel_size, stride=1)

    def forward(self, x):
        moving_mean = self.moving_avg(x)
        res = x - moving_mean
        return res, moving_mean


class DecompLinear(nn.Module):
    """Decomposition-Linear with an ``individual`` flag; two buffers filled in one loop."""

    def __init__(self, seq_len=24, pred_len=12, enc_in=5, individual=True, alloc="zeros_to"):
        super(DecompLinear, self).__init__()
        self.seq_len = seq_len
        self.pred_len = pred_len
        self.decompsition = SeriesDecomp(5)
        self.individual = individual
        self.channels = enc_in
        self.alloc = alloc
        if self.individual:
            self.Linear_Seasonal = nn.ModuleList()
            self.Linear_Trend = nn.ModuleList()
            for i in range(self.channels):
                self.Linear_Seasonal.append(nn.Linear(self.seq_len, self.pred_len))
                self.Linear_Trend.append(nn.Linear(self.seq_len, self.pred_len))
        else:
            self.Linear_Seasonal = nn.Linear(self.seq_len, self.pred_len)
            self.Linear_Trend = nn.Linear(self.seq_len, self.pred_len)

    def _buffer(self, like):
        shape = [like.size(0), like.size(1), self.pred_len]
        if self.alloc == "zeros_to":
            return torch.zeros(shape, dtype=like.dtype).to(like.device)
        if self.alloc == "new_zeros":
            return like.new_zeros(shape)
        if self.alloc == "empty_type_as":
            return torch.empty(shape).type_as(like)
        if self.alloc == "zeros_to_dtype":
            return torch.zeros(shape).to(like.dtype)
        raise ValueError(self.alloc)

    def forward(self, x):
        # x: [Batch, Input length, Channel]
        seasonal_init, trend_init = self.decompsition(x)
        seasonal_init, trend_init = seasonal_init.permute(0, 2, 1), trend_init.permute(0, 2, 1)
        if self.individual:
            seasonal_output = self._buffer(seasonal_init)
            trend_output = self._buffer(trend_init)
            for i in range(self.channels):
                seasonal_output[:, i, :] = self.Linear_Seasonal[i](seasonal_init[:, i, :])
                trend_output[:, i, :] = self.Linear_Trend[i](trend_init[:, i, :])
        else:
            seasonal_output = self.Linear_Seasonal(seasonal_init)
            trend_output = self.Linear_Trend(trend_init)
        x = seasonal_output + trend_output
        return x.permute(0, 2, 1)  # to [Batch, Output length, Channel]


class ZerosLikeConv(nn.Module):
    """Per-channel Conv1d into ``torch.zeros_like`` (an EEG-style depthwise filter bank)."""

    def __init__(self, n_chans=6, n_filters=4, k=5):
        super().__init__()
        self.n_chans = n_chans
        self.temporal = nn.ModuleList([nn.Conv1d(1, 1, k, padding=k // 2)
                                       for _ in range(n_chans)])

    def forward(self, x):  # (B, chans, T)
        out = torch.zeros_like(x)
        for c in range(self.n_chans):
            out[:, c:c + 1, :] = self.temporal[c](x[:, c:c + 1, :])
        return F.elu(out)


class CudaBuffer(nn.Module):
    """Per-variable Linear heads into a buffer moved with ``.cuda()`` (needs a GPU)."""

    def __init__(self, n=4, d=6):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

    def forward(self, x):
        out = torch.zeros(x.shape[0], x.shape[1], 6).cuda()
        for i, head in enumerate(self.heads):
            out[:, i, :] = head(x[:, i, :])
        return out.permute(0, 2, 1)


# ----------------------------------------------------------------- 2. rows reshaped

class FlattenHead(nn.Module):
    def __init__(self, individual=True, n_vars=4, nf=6 * 5, target_window=7, head_dropout=0.1):
        super().__init__()
        self.individual = individual
        self.n_vars = n_vars
        if self.individual:
            self.linears = nn.ModuleList()
            self.dropouts = nn.ModuleList()
            self.flattens = nn.ModuleList()
            for i in range(self.n_vars):
                self.flattens.append(nn.Flatten(start_dim=-2))
                self.linears.append(nn.Linear(nf, target_window))
                self.dropouts.append(nn.Dropout(head_dropout))
        else:
            self.flatten = nn.Flatten(start_dim=-2)
            self.linear = nn.Linear(nf, target_window)
            self.dropout = nn.Dropout(head_dropout)

    def forward(self, x):  # x: [bs x nvars x d_model x patch_num]
        if self.individual:
            x_out = []
            for i in range(self.n_vars):
                z = self.flattens[i](x[:, i, :, :])  # z: [bs x d_model * patch_num]
                z = self.linears[i](z)  # z: [bs x target_window]
                z = self.dropouts[i](z)
                x_out.append(z)
            x = torch.stack(x_out, dim=1)  # x: [bs x nvars x target_window]
        else:
            x = self.flatten(x)
            x = self.linear(x)
            x = self.dropout(x)
        return x


class ReshapeHeads(nn.Module):
    """``reshape`` inside a comprehension, then a per-row Linear."""

    def __init__(self, n=3, a=4, b=5, out=6):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(a * b, out) for _ in range(n))

    def forward(self, x):  # (B, n, a, b)
        B = x.shape[0]
        return torch.stack([h(x[:, i].reshape(B, -1)) for i, h in enumerate(self.heads)], 1)


# ----------------------------------------------------------------- 3. last-axis features

class NumericEmbedding(nn.Module):
    """One ``Linear(1, d)`` per continuous feature of a (B, T, F) input."""

    def __init__(self, n_features=5, d_model=8, stack_dim=-2):
        super().__init__()
        self.stack_dim = stack_dim
        self.embeddings = nn.ModuleList([nn.Linear(1, d_model) for _ in range(n_features)])

    def forward(self, x):
        embedded = [emb(x[..., i].unsqueeze(-1)) for i, emb in enumerate(self.embeddings)]
        return torch.stack(embedded, dim=self.stack_dim)


class SliceEmbedding(nn.Module):
    """``x[:, :, i:i+1]`` per feature, each a Linear(1, d); collected in a dict by name."""

    def __init__(self, names=("price", "volume", "temp", "hour"), d_model=6):
        super().__init__()
        self.names = list(names)
        self.proj = nn.ModuleDict({n: nn.Linear(1, d_model) for n in self.names})

    def forward(self, x):  # (B, T, F)
        out = OrderedDict()
        for i, name in enumerate(self.names):
            out[name] = self.proj[name](x[:, :, i:i + 1])
        return torch.stack([out[n] for n in self.names], dim=2)


class GroupedFeatureLinear(nn.Module):
    """``Linear(k, d)`` per block of k features on the last axis, concatenated."""

    def __init__(self, groups=3, k=4, d=5):
        super().__init__()
        self.k = k
        self.lins = nn.ModuleList(nn.Linear(k, d) for _ in range(groups))

    def forward(self, x):  # (B, T, groups * k)
        return torch.cat([lin(x[..., g * self.k:(g + 1) * self.k])
                          for g, lin in enumerate(self.lins)], dim=-1)


# ----------------------------------------------------------------- 4. gated residual towers

class GLU(nn.Module):
    def __init__(self, input_size, output_size):
        super().__init__()
        self.fc1 = nn.Linear(input_size, output_size)
        self.fc2 = nn.Linear(input_size, output_size)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        sig = self.sigmoid(self.fc1(x))
        x = self.fc2(x)
        return torch.mul(sig, x)


class GatedResidualNetwork(nn.Module):
    def __init__(self, input_size, hidden_size, output_size, dropout=0.1, context_size=None):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.hidden_size = hidden_size
        if self.input_size != self.output_size:
            self.skip_layer = nn.Linear(self.input_size, self.output_size)
        self.fc1 = nn.Linear(self.input_size, self.hidden_size)
        self.elu1 = nn.ELU()
        self.fc2 = nn.Linear(self.hidden_size, self.output_size)
        self.dropout = nn.Dropout(dropout)
        self.gate = GLU(self.output_size, self.output_size)
        self.norm = nn.LayerNorm(self.output_size)

    def forward(self, x):
        if self.input_size != self.output_size:
            residual = self.skip_layer(x)
        else:
            residual = x
        x = self.fc1(x)
        x = self.elu1(x)
        x = self.fc2(x)
        x = self.dropout(x)
        x = self.gate(x)
        x = x + residual
        x = self.norm(x)
        return x


class VariableGRNs(nn.Module):
    """One GRN per variable of a (B, T, n_vars, d) input, stacked over variables."""

    def __init__(self, n_vars=4, d=6, hidden=8, out=None):
        super().__init__()
        out = out or d
        self.num_inputs = n_vars
        self.single_variable_grns = nn.ModuleList()
        for i in range(self.num_inputs):
            self.single_variable_grns.append(GatedResidualNetwork(d, hidden, out, 0.1))

    def forward(self, embedding):
        var_outputs = []
        for i in range(self.num_inputs):
            var_outputs.append(self.single_variable_grns[i](embedding[:, :, i, :]))
        var_outputs = torch.stack(var_outputs, axis=-1)
        return var_outputs


# ----------------------------------------------------------------- 5. optional arguments

class ContextHeads(nn.Module):
    def __init__(self, n=4, d=8, out=3):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(d, out) for _ in range(n))
        self.ctx = nn.Linear(d, out)

    def forward(self, x, context=None, mask=None):
        outs = torch.stack([head(x[:, i]) for i, head in enumerate(self.heads)], dim=1)
        if context is not None:
            outs = outs + self.ctx(context).unsqueeze(1)
        if mask is not None:
            outs = outs.masked_fill(mask, 0.0)
        return {"pred": outs, "aux": None}


# ----------------------------------------------------------------- 6. kernel sizes

class MultiScaleRows(nn.Module):
    """Rows that differ only in kernel size ('same' padding), one per row of x."""

    def __init__(self, C=4, kernels=(3, 5, 7, 9)):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(C, C, k, padding="same") for k in kernels)

    def forward(self, x):  # (B, C, H, W)
        return torch.stack([conv(x[:, :, i]) for i, conv in enumerate(self.convs)], 2)


class InceptionBranches(nn.Module):
    """Parallel branches on one input, concatenated on channels (Inception-style)."""

    def __init__(self, in_ch=4, out_ch=6, kernels=(9, 19, 39)):
        super().__init__()
        self.bottleneck = nn.Conv1d(in_ch, in_ch, 1, bias=False)
        self.convs = nn.ModuleList(
            [nn.Conv1d(in_ch, out_ch, k, padding=k // 2, bias=False) for k in kernels])
        self.bn = nn.BatchNorm1d(out_ch * len(kernels))

    def forward(self, x):
        x = self.bottleneck(x)
        out = torch.cat([conv(x) for conv in self.convs], dim=1)
        return F.relu(self.bn(out))


class PairedLinear(nn.Module):
    """Query/key/value projections of one input, as three Linears."""

    def __init__(self, d=8):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
        return att @ v


# ----------------------------------------------------------------- 7. pools, raw params

class PooledTowers(nn.Module):
    def __init__(self, H=4, C=3, C_out=5):
        super().__init__()
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Conv1d(C, C_out, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2),
                          nn.Conv1d(C_out, C_out, 3, padding=1), nn.AdaptiveAvgPool1d(1))
            for _ in range(H))

    def forward(self, x):  # (B, C, H, W)
        feats = [tower(x[:, :, h, :]).squeeze(-1) for h, tower in enumerate(self.towers)]
        return torch.stack(feats, dim=1)


class RawParamHeads(nn.Module):
    def __init__(self, n=4, d_in=6, d_out=3):
        super().__init__()
        self.W = nn.Parameter(torch.randn(n, d_in, d_out) / math.sqrt(d_in))
        self.b = nn.Parameter(torch.zeros(n, d_out))
        self.n = n

    def forward(self, x):  # (B, n, d_in)
        outs = []
        for i in range(self.n):
            outs.append(x[:, i] @ self.W[i] + self.b[i])
        return torch.stack(outs, dim=1)


class FLinearParamList(nn.Module):
    def __init__(self, n=4, d_in=6, d_out=3):
        super().__init__()
        self.w = nn.ParameterList(nn.Parameter(torch.randn(d_out, d_in) * 0.3) for _ in range(n))

    def forward(self, x):  # (B, n, d_in)
        return torch.stack([F.linear(x[:, i], self.w[i]) for i in range(len(self.w))], 1)


# ----------------------------------------------------------------- 8. weight_norm

class WeightNormRows(nn.Module):
    def __init__(self, H=4, C=3, C_out=5):
        super().__init__()
        self.convs = nn.ModuleList(
            torch.nn.utils.weight_norm(nn.Conv1d(C, C_out, 3, padding=1)) for _ in range(H))

    def forward(self, x):
        return torch.stack([c(x[:, :, h]) for h, c in enumerate(self.convs)], 2)


CASES = [
    ("buffer: zeros(...).to(device), two buffers, permute", lambda: DecompLinear(alloc="zeros_to"), lambda b: (torch.randn(b, 24, 5),), 1),
    ("buffer: new_zeros", lambda: DecompLinear(alloc="new_zeros"), lambda b: (torch.randn(b, 24, 5),), 1),
    ("buffer: empty().type_as(x)", lambda: DecompLinear(alloc="empty_type_as"), lambda b: (torch.randn(b, 24, 5),), 1),
    ("buffer: zeros().to(dtype)", lambda: DecompLinear(alloc="zeros_to_dtype"), lambda b: (torch.randn(b, 24, 5),), 1),
    ("buffer: zeros_like, channel slices", ZerosLikeConv, lambda b: (torch.randn(b, 6, 20),), 1),
    ("reshaped rows: Flatten modules + Linear + Dropout", FlattenHead, lambda b: (torch.randn(b, 4, 6, 5),), 1),
    ("reshaped rows: reshape + Linear", ReshapeHeads, lambda b: (torch.randn(b, 3, 4, 5),), 1),
    ("last axis: Linear(1,d) on x[..., i].unsqueeze(-1), (B,T,F)", NumericEmbedding, lambda b: (torch.randn(b, 7, 5),), 1),
    ("last axis: stacked on the last dim", lambda: NumericEmbedding(stack_dim=-1), lambda b: (torch.randn(b, 7, 5),), 1),
    ("last axis: x[:, :, i:i+1], ModuleDict, dict", SliceEmbedding, lambda b: (torch.randn(b, 7, 4),), 1),
    ("last axis: Linear(k,d) blocks, cat", GroupedFeatureLinear, lambda b: (torch.randn(b, 7, 12),), 1),
    ("gated residual towers (GRN, GLU, LayerNorm)", VariableGRNs, lambda b: (torch.randn(b, 5, 4, 6),), 1),
    ("gated residual towers with skip Linear", lambda: VariableGRNs(out=5), lambda b: (torch.randn(b, 5, 4, 6),), 1),
    ("optional args: context=None, mask=None, dict output", ContextHeads, lambda b: (torch.randn(b, 4, 8),), 1),
    ("kernel sizes: rows differ only in k ('same')", MultiScaleRows, lambda b: (torch.randn(b, 4, 4, 16),), 1),
    ("kernel sizes: Inception branches on one input", InceptionBranches, lambda b: (torch.randn(b, 4, 50),), 1),
    ("paired Linears on one input (q, k, v)", PairedLinear, lambda b: (torch.randn(b, 5, 8),), 1),
    ("pooling inside per-row towers", PooledTowers, lambda b: (torch.randn(b, 3, 4, 16),), 1),
    ("raw parameters: x_i @ W[i] + b[i]", RawParamHeads, lambda b: (torch.randn(b, 4, 6),), 1),
    ("raw parameters: F.linear with ParameterList", FLinearParamList, lambda b: (torch.randn(b, 4, 6),), 1),
    ("old-style weight_norm rows", WeightNormRows, lambda b: (torch.randn(b, 3, 4, 16),), 1),
]
