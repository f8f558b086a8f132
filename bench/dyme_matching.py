"""DyMe's matching on the attention input ``n`` (this pack) vs on the keys ``to_k(n)`` (the authors' code).

Issue 10. The pack merges on cosine similarity of the self-attention *inputs* (what the bank
stores, so EA's keys and values and FF's outputs merge alike, with no access to the layer's
weights); the authors' release matches on the keys. For every self-attention layer of the
full-size SD1.5 architecture (random weights), the inputs of two consecutive frames are
captured (forward pre-hooks, this script only), joined as DyMe joins bank and new frame, split
with the same random keys, and matched both ways. Printed per resolution level: the share of
source tokens whose destination is the same, and the relative difference of the merged keys
``|K(merge_n) - K(merge_K)| / |K(merge_K)|``.

With random weights ``to_k`` is a random projection, which roughly keeps cosine similarities,
so agreement is expected to be high here; trained keys may differ. Usage:
``python bench/dyme_matching.py --device cpu --size 256`` (real footage: vtest.avi, see clips.py).
"""
from __future__ import annotations

import argparse
import collections

from bank_overhead import build_unet, conditioning, device_name, parse_common, setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parse_common(parser)
    parser.add_argument("--sigma", type=float, default=3.0, help="noise level of the captured step (default 3.0)")
    args = parser.parse_args()
    torch, dtype = setup(args)
    if args.size == 128 and args.device == "cpu":
        args.size = 256
    from clips import find_clip, load_clip
    from host import tiny_models as tm

    from streamv2v.streamv2v_core.bank.merging import apply_matching, random_bipartite_matching

    unet = build_unet(args, dtype)
    vae = tm.tiny_taesd_vae(1)
    base = unet.model
    frames = load_clip(find_clip("vtest.avi"), 2, args.size, start=40)
    captured = collections.defaultdict(list)  # module name -> [n of frame 0, n of frame 1]
    hooks = [module.register_forward_pre_hook(lambda m, a, name=name: captured[name].append(a[0].detach()))
             for name, module in base.diffusion_model.named_modules() if name.endswith("attn1")]
    context = conditioning(args)[0][0].to(dtype)
    with torch.inference_mode():
        for frame in frames:
            latent = base.process_latent_in(vae.encode(frame[None]))
            noisy = latent + args.sigma * torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
            base.apply_model(noisy.to(dtype), torch.tensor([args.sigma]), c_crossattn=context)
    for hook in hooks:
        hook.remove()

    by_level = collections.defaultdict(lambda: [0, 0, 0.0, 0])  # tokens -> agree, sources, rel diff sum, layers
    modules = dict(base.diffusion_model.named_modules())
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for name, (old, new) in captured.items():
            joined = torch.cat([old, new], dim=1).float()  # [1, 2T, C]: bank (frame 0) + new frame
            t = new.shape[1]
            keys = torch.rand(1, joined.shape[1], generator=g)
            to_k = modules[name.replace("attn1", "attn1.to_k")]
            k_joined = to_k(joined.to(dtype)).float()
            on_n = random_bipartite_matching(joined, t, keys)
            on_k = random_bipartite_matching(k_joined, t, keys)
            merged_n, merged_k = apply_matching(k_joined, on_n), apply_matching(k_joined, on_k)
            stats = by_level[t]
            stats[0] += int((on_n.dst_of_src == on_k.dst_of_src).sum())
            stats[1] += on_n.dst_of_src.numel()
            stats[2] += float((merged_n - merged_k).norm() / merged_k.norm())
            stats[3] += 1

    print(f"\n# DyMe matching on n vs on to_k(n) — {args.model} SD1.5 UNet (random weights), {args.size}x{args.size}, "
          f"vtest.avi frames 40-41, sigma {args.sigma}, {device_name(args.device)}\n")
    print("| tokens per frame | layers | same destination | merged keys, relative difference |")
    print("|---:|---:|---:|---:|")
    total = [0, 0]
    for tokens in sorted(by_level, reverse=True):
        agree, sources, diff, layers = by_level[tokens]
        total[0] += agree
        total[1] += sources
        print(f"| {tokens} | {layers} | {agree / sources:.1%} | {diff / layers:.4f} |")
    print(f"| all | {sum(v[3] for v in by_level.values())} | {total[0] / total[1]:.1%} | |")


if __name__ == "__main__":
    main()
