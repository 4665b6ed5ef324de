"""A random checkpoint with a real tokenizer: dry runs of the real pipeline (train.py, eval.py,
warmup_data.py) on a CPU, before renting GPUs for the real model.

    python make_random_checkpoint.py --config ../shared/models/deepseek-r1-distill-qwen-1.5b \\
        --tokenizer ../shared/models/deepseek-r1-distill-qwen-1.5b --out runs/random-tiny \\
        --layers 2 --hidden 64 --intermediate 128 --heads 4 --kv-heads 2

The architecture is the --config's (config.json: model type, vocabulary rows, RoPE, norms, biases,
tied or not) with the sizes given as flags replaced, so the tokenizer's ids and the model's
embedding rows match as in the real checkpoint; the weights are random (normal(0, 0.02), seeded).
The tokenizer files (tokenizer.json, tokenizer_config.json) are copied as they are: train.py sets
up `<short>` when it loads them (chat.load_tokenizer), as it does for the real model.
"""

import argparse
import dataclasses
import json
import os
import shutil

import torch

from model import ModelConfig, Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a config.json, or a checkpoint folder that holds one")
    ap.add_argument("--tokenizer", required=True, help="a folder with tokenizer.json (and tokenizer_config.json)")
    ap.add_argument("--out", required=True, help="the new checkpoint folder")
    ap.add_argument("--layers", type=int, help="num_hidden_layers (default: the config's)")
    ap.add_argument("--hidden", type=int, help="hidden_size (default: the config's)")
    ap.add_argument("--intermediate", type=int, help="intermediate_size, the MLP width (default: the config's)")
    ap.add_argument("--heads", type=int, help="num_attention_heads (default: the config's)")
    ap.add_argument("--kv-heads", type=int, help="num_key_value_heads (default: the config's)")
    ap.add_argument("--head-dim", type=int, help="default: hidden / heads when --hidden or --heads is given, "
                    "else the config's")
    ap.add_argument("--dtype", default="float32", help="of the saved weights (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="default %(default)s")
    args = ap.parse_args(argv)

    config_file = os.path.join(args.config, "config.json") if os.path.isdir(args.config) else args.config
    if not os.path.isfile(config_file):
        ap.error(f"--config {args.config}: no config.json there")
    if not os.path.isfile(os.path.join(args.tokenizer, "tokenizer.json")):
        ap.error(f"--tokenizer {args.tokenizer}: no tokenizer.json there")
    with open(config_file) as f:
        cfg = ModelConfig.from_hf(json.load(f), source=config_file)
    sizes = {"num_hidden_layers": args.layers, "hidden_size": args.hidden, "intermediate_size": args.intermediate,
             "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in sizes.items() if v is not None}, dtype=args.dtype)
    if args.head_dim or args.hidden or args.heads:
        cfg.head_dim = args.head_dim or cfg.hidden_size // cfg.num_attention_heads
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        ap.error(f"--heads {cfg.num_attention_heads} is not a multiple of --kv-heads {cfg.num_key_value_heads}")

    torch.manual_seed(args.seed)
    model = Transformer(cfg).to(getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(args.tokenizer, name)):
            shutil.copyfile(os.path.join(args.tokenizer, name), os.path.join(args.out, name))
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: random {cfg.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.vocab_size} vocabulary rows, {n / 1e6:.1f}M parameters, tokenizer from {args.tokenizer}")


if __name__ == "__main__":
    main()
