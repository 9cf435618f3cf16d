"""A benchmark-only transcription of the utae-paps U-TAE (semantic configuration), the baseline that
`bench_vs_reference.py` times sitskit against. Never imported by the package.

Written from the architecture description in docs/models.md ("U-TAE / L-TAE") and the utae-paps layout:
per-frame encoder through `smart_forward` (B and T merged, frames that are all zeros skipped, and a full
forward on an all-zeros dummy of the input size to learn the output shape), padding inferred from all-zero
frames, the L-TAE on [(B H W), T, C] with permutes around GroupNorm/Conv1d, and the skip aggregation via
`chunk`/`stack`. State-dict keys are those of utae-paps, so `sitskit`'s `utae` weights load strictly.
Numerically it equals `build("utae", mode="reference")` (checked by the harness: max |Δ| in eval mode).
"""
from __future__ import annotations

import torch
from torch import nn


class TemporallySharedBlock(nn.Module):
    def __init__(self, pad_value=None):
        super().__init__()
        self.out_shape = None
        self.pad_value = pad_value

    def smart_forward(self, input):
        if len(input.shape) == 4:
            return self.forward(input)
        b, t, c, h, w = input.shape
        if self.pad_value is not None:  # the dummy pass: a whole forward only to learn the output shape
            dummy = torch.zeros(input.shape, device=input.device).float()
            self.out_shape = self.forward(dummy.view(b * t, c, h, w)).shape
        out = input.view(b * t, c, h, w)
        if self.pad_value is not None:
            pad_mask = (out == self.pad_value).all(dim=-1).all(dim=-1).all(dim=-1)
            if pad_mask.any():
                valid = self.forward(out[~pad_mask])
                # upstream builds `temp` in float32, so under bf16 autocast the assignment fails (dtype
                # mismatch); here it takes the output's dtype: the same values in fp32, and a bf16 run at all
                temp = torch.ones(self.out_shape, device=input.device, dtype=valid.dtype, requires_grad=False) \
                    * self.pad_value
                temp[~pad_mask] = valid
                out = temp
            else:
                out = self.forward(out)
        else:
            out = self.forward(out)
        _, c, h, w = out.shape
        return out.view(b, t, c, h, w)


class ConvLayer(nn.Module):
    def __init__(self, nkernels, norm="batch", k=3, s=1, p=1, n_groups=4, last_relu=True, padding_mode="reflect"):
        super().__init__()
        layers = []
        if norm == "batch":
            nl = nn.BatchNorm2d
        else:
            def nl(num_feats):
                return nn.GroupNorm(num_channels=num_feats, num_groups=n_groups)
        for i in range(len(nkernels) - 1):
            layers.append(nn.Conv2d(nkernels[i], nkernels[i + 1], k, padding=p, stride=s, padding_mode=padding_mode))
            layers.append(nl(nkernels[i + 1]))
            if last_relu or i < len(nkernels) - 2:
                layers.append(nn.ReLU())
        self.conv = nn.Sequential(*layers)

    def forward(self, input):
        return self.conv(input)


class ConvBlock(TemporallySharedBlock):
    def __init__(self, nkernels, pad_value=None, norm="batch", last_relu=True, padding_mode="reflect"):
        super().__init__(pad_value=pad_value)
        self.conv = ConvLayer(nkernels, norm=norm, last_relu=last_relu, padding_mode=padding_mode)

    def forward(self, input):
        return self.conv(input)


class DownConvBlock(TemporallySharedBlock):
    def __init__(self, d_in, d_out, k, s, p, pad_value=None, norm="batch", padding_mode="reflect"):
        super().__init__(pad_value=pad_value)
        self.down = ConvLayer([d_in, d_in], norm=norm, k=k, s=s, p=p, padding_mode=padding_mode)
        self.conv1 = ConvLayer([d_in, d_out], norm=norm, padding_mode=padding_mode)
        self.conv2 = ConvLayer([d_out, d_out], norm=norm, padding_mode=padding_mode)

    def forward(self, input):
        out = self.conv1(self.down(input))
        return out + self.conv2(out)


class UpConvBlock(nn.Module):
    def __init__(self, d_in, d_out, k, s, p, norm="batch", d_skip=None, padding_mode="reflect"):
        super().__init__()
        d = d_out if d_skip is None else d_skip
        self.skip_conv = nn.Sequential(nn.Conv2d(d, d, 1), nn.BatchNorm2d(d), nn.ReLU())
        self.up = nn.Sequential(nn.ConvTranspose2d(d_in, d_out, k, s, p), nn.BatchNorm2d(d_out), nn.ReLU())
        self.conv1 = ConvLayer([d_out + d, d_out], norm=norm, padding_mode=padding_mode)
        self.conv2 = ConvLayer([d_out, d_out], norm=norm, padding_mode=padding_mode)

    def forward(self, input, skip):
        out = torch.cat([self.up(input), self.skip_conv(skip)], dim=1)
        out = self.conv1(out)
        return out + self.conv2(out)


class TemporalAggregator(nn.Module):
    def __init__(self, mode="att_group"):
        super().__init__()
        self.mode = mode

    def forward(self, x, pad_mask=None, attn_mask=None):
        n_heads, b, t, h, w = attn_mask.shape
        attn = attn_mask.view(n_heads * b, t, h, w)
        if x.shape[-2] > w:
            attn = nn.Upsample(size=x.shape[-2:], mode="bilinear", align_corners=False)(attn)
        else:
            attn = nn.AvgPool2d(kernel_size=w // x.shape[-2])(attn)
        attn = attn.view(n_heads, b, t, *x.shape[-2:])
        if pad_mask is not None and pad_mask.any():
            attn = attn * (~pad_mask).float()[None, :, :, None, None]
        out = torch.stack(x.chunk(n_heads, dim=2))  # [h, B, T, C/h, H, W]
        out = (attn[:, :, :, None, :, :] * out).sum(dim=2)
        return torch.cat(list(out), dim=1)


class PositionalEncoder(nn.Module):
    def __init__(self, d, T=1000, repeat=None):
        super().__init__()
        self.d, self.T, self.repeat = d, T, repeat
        self.denom = torch.pow(T, 2 * (torch.arange(d).float() // 2) / d)

    def forward(self, batch_positions):
        table = batch_positions[:, :, None] / self.denom[None, None, :].to(batch_positions.device)
        table[:, :, 0::2] = torch.sin(table[:, :, 0::2])
        table[:, :, 1::2] = torch.cos(table[:, :, 1::2])
        if self.repeat is not None:
            table = torch.cat([table for _ in range(self.repeat)], dim=-1)
        return table


class MultiHeadAttention(nn.Module):
    def __init__(self, n_head, d_k, d_in, attn_dropout=0.1):
        super().__init__()
        self.n_head, self.d_k, self.d_in = n_head, d_k, d_in
        self.Q = nn.Parameter(torch.zeros((n_head, d_k))).requires_grad_(True)
        nn.init.normal_(self.Q, mean=0, std=(2.0 / d_k) ** 0.5)
        self.fc1_k = nn.Linear(d_in, n_head * d_k)
        nn.init.normal_(self.fc1_k.weight, mean=0, std=(2.0 / d_k) ** 0.5)
        self.temperature = d_k ** 0.5
        self.dropout = nn.Dropout(attn_dropout)

    def forward(self, v, pad_mask=None):
        d_k, n_head = self.d_k, self.n_head
        sz_b, seq_len, _ = v.size()
        q = torch.stack([self.Q for _ in range(sz_b)], dim=1).view(-1, d_k)
        k = self.fc1_k(v).view(sz_b, seq_len, n_head, d_k)
        k = k.permute(2, 0, 1, 3).contiguous().view(-1, seq_len, d_k)
        if pad_mask is not None:
            pad_mask = pad_mask.repeat((n_head, 1))
        v = torch.stack(v.split(v.shape[-1] // n_head, dim=-1)).view(n_head * sz_b, seq_len, -1)
        attn = torch.matmul(q.unsqueeze(1), k.transpose(1, 2)) / self.temperature
        if pad_mask is not None:
            attn = attn.masked_fill(pad_mask.unsqueeze(1), -1e3)
        attn = self.dropout(torch.softmax(attn, dim=2))
        output = torch.matmul(attn, v)
        attn = attn.view(n_head, sz_b, 1, seq_len).squeeze(dim=2)
        output = output.view(n_head, sz_b, 1, self.d_in // n_head).squeeze(dim=2)
        return output, attn


class LTAE2d(nn.Module):
    def __init__(self, in_channels=128, n_head=16, d_k=4, mlp=(256, 128), dropout=0.2, d_model=256, T=1000):
        super().__init__()
        self.n_head, self.d_model = n_head, d_model
        self.inconv = nn.Conv1d(in_channels, d_model, 1)
        self.positional_encoder = PositionalEncoder(d_model // n_head, T=T, repeat=n_head)
        self.attention_heads = MultiHeadAttention(n_head=n_head, d_k=d_k, d_in=d_model)
        self.in_norm = nn.GroupNorm(num_groups=n_head, num_channels=in_channels)
        self.out_norm = nn.GroupNorm(num_groups=n_head, num_channels=mlp[-1])
        layers = []
        for i in range(len(mlp) - 1):
            layers += [nn.Linear(mlp[i], mlp[i + 1]), nn.BatchNorm1d(mlp[i + 1]), nn.ReLU()]
        self.mlp = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, batch_positions=None, pad_mask=None):
        sz_b, seq_len, d, h, w = x.shape
        if pad_mask is not None:
            pad_mask = pad_mask.unsqueeze(-1).repeat((1, 1, h)).unsqueeze(-1).repeat((1, 1, 1, w))
            pad_mask = pad_mask.permute(0, 2, 3, 1).contiguous().view(sz_b * h * w, seq_len)
        out = x.permute(0, 3, 4, 1, 2).contiguous().view(sz_b * h * w, seq_len, d)
        out = self.in_norm(out.permute(0, 2, 1)).permute(0, 2, 1)
        out = self.inconv(out.permute(0, 2, 1)).permute(0, 2, 1)
        bp = batch_positions.unsqueeze(-1).repeat((1, 1, h)).unsqueeze(-1).repeat((1, 1, 1, w))
        bp = bp.permute(0, 2, 3, 1).contiguous().view(sz_b * h * w, seq_len)
        out = out + self.positional_encoder(bp)
        out, attn = self.attention_heads(out, pad_mask=pad_mask)
        out = out.permute(1, 0, 2).contiguous().view(sz_b * h * w, -1)
        out = self.out_norm(self.dropout(self.mlp(out)))
        out = out.view(sz_b, h, w, -1).permute(0, 3, 1, 2)
        attn = attn.view(self.n_head, sz_b, h, w, seq_len).permute(0, 1, 4, 2, 3)
        return out, attn


class ReferenceUTAE(nn.Module):
    """forward(input [B,T,C,H,W] with all-zero padded frames, batch_positions [B,T]) -> [B,K,H,W]."""

    def __init__(self, input_dim=10, encoder_widths=(64, 64, 64, 128), decoder_widths=(32, 32, 64, 128),
                 out_conv=(32, 20), str_conv_k=4, str_conv_s=2, str_conv_p=1, n_head=16, d_model=256, d_k=4,
                 pad_value=0, padding_mode="reflect"):
        super().__init__()
        self.n_stages = len(encoder_widths)
        self.pad_value = pad_value
        ew, dw = list(encoder_widths), list(decoder_widths)
        self.in_conv = ConvBlock([input_dim, ew[0], ew[0]], pad_value=pad_value, norm="group",
                                 padding_mode=padding_mode)
        self.down_blocks = nn.ModuleList(
            DownConvBlock(ew[i], ew[i + 1], str_conv_k, str_conv_s, str_conv_p, pad_value=pad_value,
                          norm="group", padding_mode=padding_mode) for i in range(self.n_stages - 1))
        self.up_blocks = nn.ModuleList(
            UpConvBlock(dw[i], dw[i - 1], str_conv_k, str_conv_s, str_conv_p, norm="batch", d_skip=ew[i - 1],
                        padding_mode=padding_mode) for i in range(self.n_stages - 1, 0, -1))
        self.temporal_encoder = LTAE2d(ew[-1], n_head=n_head, d_k=d_k, mlp=(d_model, ew[-1]), d_model=d_model)
        self.temporal_aggregator = TemporalAggregator("att_group")
        self.out_conv = ConvBlock([dw[0]] + list(out_conv), padding_mode=padding_mode)

    def forward(self, input, batch_positions=None):
        pad_mask = (input == self.pad_value).all(dim=-1).all(dim=-1).all(dim=-1)  # [B, T]
        out = self.in_conv.smart_forward(input)
        feature_maps = [out]
        for i in range(self.n_stages - 1):
            out = self.down_blocks[i].smart_forward(feature_maps[-1])
            feature_maps.append(out)
        out, att = self.temporal_encoder(feature_maps[-1], batch_positions=batch_positions, pad_mask=pad_mask)
        for i in range(self.n_stages - 1):
            skip = self.temporal_aggregator(feature_maps[-(i + 2)], pad_mask=pad_mask, attn_mask=att)
            out = self.up_blocks[i](out, skip)
        return self.out_conv(out)
