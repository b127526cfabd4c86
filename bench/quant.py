"""Quantization modes on one Wan 2.2 A14B expert: time, cache, memory, and what recovery wins back.

For each mode: quantize time (bf16 expert in host memory, one linear at a time on the GPU, as the
trainer does it), cache write and cached reload time, weight memory, and the relative output
error vs bf16 of the first `--eval-blocks` transformer blocks, without and with a locally fitted
rank-`--rank` correction, on calibration and held-out inputs. Weights are random (no download);
inputs to block 0 come from the model's own embedders on random latents/text ("iso"), and again
with the hidden states replaced by samples whose covariance has eigenvalues k^-2 ("aniso"):
random weights fed isotropic activations leave little to recover, real activations are
anisotropic. Per-layer errors of the same run are written to --out.

    python -m bench.quant --tiny                          # CPU, seconds
    python -m bench.quant --modes uint4,nf4               # GPU, full-size expert
    python -m bench.quant --modes float8,float8_mm,qfloat8 --layers 40   # float8_mm: fp8 matmuls too

Imports of bitsandbytes / optimum-quanto happen only for the modes asked for.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

from bench.recovery_report import anisotropic, block_report
from wanlora.models.geometry import TINY, WAN22_A14B, build_transformer
from wanlora.io import atomic_write_json
from wanlora.models.quant import enable_fp8_matmul, quantize_cached, weight_bytes
from wanlora.models.recovery import capture_block_inputs, fit_block, fit_correction, weights_from_model


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}"


def size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_inputs(cfg: dict, latent: tuple[int, int, int], seed: int, text_len: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    f, h, w = latent
    return {
        "hidden_states": torch.randn(1, cfg["in_channels"], f, h, w, generator=g).to(torch.bfloat16),
        "timestep": torch.tensor([int(torch.randint(0, 1000, (1,), generator=g))]),
        "encoder_hidden_states": (0.1 * torch.randn(1, text_len, cfg["text_dim"], generator=g)).to(torch.bfloat16),
        "return_dict": False,
    }


def to_device(inp, device):
    args, kwargs = inp

    def move(v):  # rotary embeddings come as a tuple of tensors
        if torch.is_tensor(v):
            return v.to(device)
        return type(v)(move(x) for x in v) if isinstance(v, (tuple, list)) else v

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def anisotropize(inp, seed: int):
    """Same block input with hidden states of covariance eigenvalues k^-2, scaled to the original norm."""
    (hidden, *rest), kwargs = inp
    b, n, d = hidden.shape
    x = anisotropic(b * n, d, decay=2.0, seed=seed, device=hidden.device).view(b, n, d)
    x = x * (hidden.float().norm() / x.norm())
    return (x.to(hidden.dtype), *rest), kwargs


def layer_direct(ref_block, q_block, rank: int, device) -> dict[str, dict[str, float]]:
    """Each quantized linear fed inputs of covariance eigenvalues k^-2 directly (2·in calibration
    samples, in held-out ones): held-out relative output error before recovery, after a plain-SVD
    correction and after the whitened (calibrated) one."""
    from wanlora.models.quant import dequantized_weight, quantized_modules

    out = {}
    for name, module in quantized_modules(q_block).items():
        w = ref_block.get_submodule(name).weight.to(device, torch.float32)
        wq = dequantized_weight(module).to(device, torch.float32)
        n_in = w.shape[1]
        x = anisotropic(3 * n_in, n_in, seed=n_in, device=device)
        cal, held = x[: 2 * n_in].T, x[2 * n_in:].T
        ref = (w @ held).norm()
        err = lambda a, b: float(((w - wq - b.to(device) @ a.to(device)) @ held).norm() / ref)  # noqa: E731
        zero = torch.zeros(1, n_in, device=device), torch.zeros(w.shape[0], 1, device=device)
        out[name] = {"before": err(*zero), "plain": err(*fit_correction(w, wq, None, rank)),
                     "whitened": err(*fit_correction(w, wq, cal, rank))}
    return out


def block_chain(ref, inputs, n_blocks, device):
    """Block inputs for blocks 0..n-1 from the bf16 model, one block on the device at a time."""
    per_block = [inputs]
    for i in range(n_blocks - 1):
        block = copy.deepcopy(ref.blocks[i]).to(device)
        with torch.no_grad():
            nxt = [((block(*a, **k),) + a[1:], k) for a, k in per_block[-1]]
        per_block.append(nxt)
        del block
    return per_block


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny 2-layer expert on CPU")
    p.add_argument("--modes", default="float8,float8_mm,qfloat8,nf4,uint4")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks (default: all 40)")
    p.add_argument("--heads", type=int, default=None, help="attention heads of 128 (default 40; narrower for CPU runs)")
    p.add_argument("--ffn", type=int, default=None, help="FFN width (default 13824)")
    p.add_argument("--eval-blocks", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--latent", default=None,
                   help="latent F,H,W (default 8,48,48 = 4608 tokens: 4 batches outnumber 13824 FFN features; tiny 2,8,8)")
    p.add_argument("--calib", type=int, default=4, help="calibration batches (one more is held out)")
    p.add_argument("--cache-dir", default="scratch/bench_quant")
    p.add_argument("--out", default=None, help="write all numbers as JSON here")
    args = p.parse_args()

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    cfg = dict(TINY if args.tiny else WAN22_A14B)
    for key, value in (("num_layers", args.layers), ("num_attention_heads", args.heads), ("ffn_dim", args.ffn)):
        if value:
            cfg[key] = value
    latent = tuple(int(v) for v in (args.latent or ("2,8,8" if args.tiny else "8,48,48")).split(","))
    group = 16 if args.tiny and args.group_size == 64 else args.group_size
    text_len = 16 if args.tiny else 512
    eval_blocks = min(args.eval_blocks, cfg["num_layers"])
    name = device_name(device)
    print(f"device: {name}; expert: {cfg['num_layers']} blocks, dim {cfg['num_attention_heads'] * cfg['attention_head_dim']}, "
          f"ffn {cfg['ffn_dim']}; latent {latent}; rank {args.rank}; group {group}")

    t = time.perf_counter()
    # random init is fast on the GPU; the expert then waits in host memory, like a loaded checkpoint
    ref = build_transformer(cfg, torch.bfloat16, device, seed=0).to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"built bf16 expert on CPU in {time.perf_counter() - t:.1f} s; {size(weight_bytes(ref))}")
    weights = weights_from_model(ref)

    raw = capture_block_inputs(ref, [model_inputs(cfg, latent, s, text_len) for s in range(args.calib + 1)])
    raw = [to_device(i, device) for i in raw]
    variants = {"iso": raw, "aniso": [anisotropize(i, seed=k) for k, i in enumerate(raw)]}
    chains = {v: block_chain(ref, inp, eval_blocks, device) for v, inp in variants.items()}
    ref_blocks = [copy.deepcopy(ref.blocks[i]).to(device) for i in range(eval_blocks)]

    results = {"device": name, "config": cfg, "latent": latent, "rank": args.rank, "group_size": group,
               "bf16_bytes": weight_bytes(ref), "modes": {}}
    for label in [m.strip() for m in args.modes.split(",") if m.strip()]:
        mode = "float8" if label == "float8_mm" else label  # float8_mm: float8 weights, fp8 matmuls
        cache = Path(args.cache_dir) / label
        shutil.rmtree(cache, ignore_errors=True)
        loads = []

        def loader():
            t0 = time.perf_counter()
            m = copy.deepcopy(ref)
            loads.append(time.perf_counter() - t0)
            return m

        mode_group = max(group, 64) if mode == "nf4" else group  # bitsandbytes: blocks of 32..4096
        key = {"bench": "random", "config": cfg, "seed": 0}
        t0 = time.perf_counter()
        q = quantize_cached(loader, cache, key, mode, group_size=mode_group, device=device)
        sync(device)
        first = time.perf_counter() - t0 - loads[-1]
        t0 = time.perf_counter()
        q = quantize_cached(loader, cache, key, mode, group_size=mode_group, device=device)
        reload = time.perf_counter() - t0 - loads[-1]
        cache_bytes = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
        q.to(device)
        if label == "float8_mm":
            enable_fp8_matmul(q)
        row = {"quantize_and_save_s": first, "reload_s": reload, "weights_bytes": weight_bytes(q),
               "cache_bytes": cache_bytes, "blocks": {}}
        row["layers_direct"] = layer_direct(ref_blocks[0], q.blocks[0], args.rank, device)
        for variant, chain in chains.items():
            for i in range(eval_blocks):
                inputs = chain[i]
                calib, held = inputs[: args.calib], inputs[args.calib:]
                fit_block(q.blocks[i], calib, weights, f"blocks.{i}.", args.rank)
                layers, whole = block_report(ref_blocks[i], q.blocks[i], {"calib": calib, "heldout": held})
                row["blocks"][f"{variant}/{i}"] = {
                    "block": {s: vars(e) for s, e in whole.items()},
                    "layers": {n: {s: vars(e) for s, e in d.items()} for n, d in layers.items()},
                }
        results["modes"][label] = row
        if args.out:  # after every mode: a run stopped by a time limit keeps the modes it finished
            atomic_write_json(args.out, results)
        print(f"{label}: quantize+save {first:.1f} s, reload {reload:.1f} s, {size(row['weights_bytes'])}; "
              f"recovery measured in {time.perf_counter() - t0:.1f} s since reload", flush=True)
        del q
        shutil.rmtree(cache, ignore_errors=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"\n{name}")
    print("| mode | quantize+save s | reload s | weights | block err iso (cal/held) before → after | "
          "block err aniso (cal/held) before → after | layer err in-block aniso held, median before → after | "
          "layer err direct k^-2 held, median before → plain SVD / whitened |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| bf16 | - | - | {size(results['bf16_bytes'])} | 0 | 0 | 0 | 0 |")
    for mode, row in results["modes"].items():
        cells = []
        for variant in ("iso", "aniso"):
            b = [row["blocks"][f"{variant}/{i}"]["block"] for i in range(eval_blocks)]
            mean = lambda s, k: statistics.fmean(x[s][k] for x in b)  # noqa: E731
            cells.append(f"{mean('calib', 'before'):.4f}/{mean('heldout', 'before'):.4f} → "
                         f"{mean('calib', 'after'):.4f}/{mean('heldout', 'after'):.4f}")
        lay = [d["heldout"] for i in range(eval_blocks) for d in row["blocks"][f"aniso/{i}"]["layers"].values()]
        med = f"{statistics.median(x['before'] for x in lay):.4f} → {statistics.median(x['after'] for x in lay):.4f}"
        direct = row["layers_direct"].values()
        dmed = lambda k: statistics.median(d[k] for d in direct)  # noqa: E731
        dcell = f"{dmed('before'):.4f} → {dmed('plain'):.4f} / {dmed('whitened'):.4f}"
        print(f"| {mode} | {row['quantize_and_save_s']:.2f} | {row['reload_s']:.2f} | {size(row['weights_bytes'])} | "
              f"{cells[0]} | {cells[1]} | {med} | {dcell} |")


if __name__ == "__main__":
    main()
