"""PyTorch eager side of BENCHMARKS.md item 7: one prior training step of the same ADM UNet.

The UNet is built here in plain PyTorch from the model config (the subset of guided-diffusion's
UNetModel our configs use: scale-shift norm, residual up/down sampling, legacy attention order,
heads of num_head_channels, no classes), with guided-diffusion's parameter names. Before timing,
it loads the weights `davi-train bench-train --fixture F` wrote, runs the same input and checks
the output against tch's: the two sides time the same network.

Usage: torch_train_step.py CONFIG.yaml FIXTURE.safetensors [--batch 64] [--seconds 20]
"""

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file


def norm(ch):
    return nn.GroupNorm(32, ch, eps=1e-5)


class Res(nn.Module):
    def __init__(self, ch, out, emb, up=False, down=False):
        super().__init__()
        self.up, self.down = up, down
        self.in_layers = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, 2 * out))
        self.out_layers = nn.Sequential(norm(out), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out, out, 3, padding=1))
        self.skip_connection = nn.Identity() if ch == out else nn.Conv2d(ch, out, 1)

    def resample(self, t):
        if self.up:
            return F.interpolate(t, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(t, 2)
        return t

    def forward(self, x, emb):
        h = self.in_layers[1](self.in_layers[0](x))
        h, x = self.resample(h), self.resample(x)
        h = self.in_layers[2](h)
        e = self.emb_layers(emb)[:, :, None, None]
        scale, shift = e.chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        return self.skip_connection(x) + h


class Attn(nn.Module):
    def __init__(self, ch, heads):
        super().__init__()
        self.heads = heads
        self.norm = norm(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x):
        b, c, hh, ww = x.shape
        qkv = self.qkv(self.norm(x.reshape(b, c, -1)))
        n = qkv.shape[-1]
        ch = c // self.heads
        q, k, v = qkv.reshape(b * self.heads, 3 * ch, n).split(ch, dim=1)
        s = 1.0 / math.sqrt(math.sqrt(ch))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s), dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, n)
        return (x.reshape(b, c, n) + self.proj_out(a)).reshape(b, c, hh, ww)


class Seq(nn.ModuleList):
    def forward(self, x, emb):
        for m in self:
            x = m(x, emb) if isinstance(m, Res) else m(x)
        return x


class UNet(nn.Module):
    def __init__(self, c):
        super().__init__()
        assert c.get("use_scale_shift_norm") and c.get("resblock_updown")
        assert not c.get("num_classes") and not c.get("use_new_attention_order")
        mc, size = c["model_channels"], c["image_size"]
        emb = 4 * mc
        self.mc = mc
        attn_ds = {size // r for r in c["attention_resolutions"]}
        heads = lambda ch: ch // c["num_head_channels"]
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        ch = c["channel_mult"][0] * mc
        self.input_blocks = nn.ModuleList([Seq([nn.Conv2d(c["in_channels"], ch, 3, padding=1)])])
        chans, ds = [ch], 1
        mults = c["channel_mult"]
        for level, mult in enumerate(mults):
            for _ in range(c["num_res_blocks"]):
                layers = [Res(ch, mult * mc, emb)]
                ch = mult * mc
                if ds in attn_ds:
                    layers.append(Attn(ch, heads(ch)))
                self.input_blocks.append(Seq(layers))
                chans.append(ch)
            if level != len(mults) - 1:
                self.input_blocks.append(Seq([Res(ch, ch, emb, down=True)]))
                chans.append(ch)
                ds *= 2
        self.middle_block = Seq([Res(ch, ch, emb), Attn(ch, heads(ch)), Res(ch, ch, emb)])
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(mults))[::-1]:
            for i in range(c["num_res_blocks"] + 1):
                layers = [Res(ch + chans.pop(), mc * mult, emb)]
                ch = mc * mult
                if ds in attn_ds:
                    layers.append(Attn(ch, heads(ch)))
                if level and i == c["num_res_blocks"]:
                    layers.append(Res(ch, ch, emb, up=True))
                    ds //= 2
                self.output_blocks.append(Seq(layers))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, c["out_channels"], 3, padding=1))

    def forward(self, x, t):
        half = self.mc // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        emb = self.time_embed(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
        hs, h = [], x
        for m in self.input_blocks:
            h = m(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for m in self.output_blocks:
            h = m(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


def linear_alphas_cumprod(steps):
    scale = 1000.0 / steps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("fixture")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=20.0)
    a = p.parse_args()
    cfg = yaml.safe_load(open(a.config))
    c = cfg["unet"]
    model = UNet(c)
    fx = load_file(a.fixture)
    weights = {k[2:]: v for k, v in fx.items() if k.startswith("w.")}
    model.load_state_dict({k: v.reshape(model.state_dict()[k].shape) for k, v in weights.items()})
    with torch.no_grad():
        out = model(fx["x"], fx["t"])
    diff = (out - fx["out"]).abs().max().item()
    print(f"same network as davi-train: max |diff| {diff:.2e} on the fixture forward")
    assert diff < 1e-3, "the PyTorch UNet does not match tch's; the timing would not compare"

    steps = cfg.get("diffusion", {}).get("steps", 1000)
    ab = linear_alphas_cumprod(steps)
    torch.manual_seed(0)
    for prm in model.parameters():  # fresh weights: timing does not depend on values
        prm.data.normal_(0, 0.05)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    s = c["image_size"]
    x0 = torch.rand(a.batch, c["in_channels"], s, s) * 2 - 1
    ts = torch.tensor([(i * 997) % steps for i in range(a.batch)])

    def step():
        noise = torch.randn_like(x0)
        abt = ab[ts][:, None, None, None]
        x_t = abt.sqrt() * x0 + (1 - abt).sqrt() * noise
        loss = F.mse_loss(model(x_t, ts)[:, : c["in_channels"]], noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step()
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < a.seconds or k < 3:
        step()
        k += 1
    sps = k / (time.perf_counter() - t0)
    print(f"PyTorch eager prior training step, batch {a.batch}: {sps:.3f} steps/s "
          f"({1 / sps:.2f} s/step, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
