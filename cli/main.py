"""The `moeray` command: parses a command line and calls the layer that does the work."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from actors.transports import transport_names

if TYPE_CHECKING:
    from model.tokenizer import ChatTokenizer


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CliError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise CliError("--prompt-ids is empty")
    return ids


def _model_dir(path: str) -> Path:
    directory = Path(path)
    if not (directory / "config.json").exists():
        raise CliError(f"{directory} is not a model folder (no config.json)")
    return directory


def cmd_init(args: argparse.Namespace) -> None:
    from model import DeepseekV2Config, DeepseekV2ForCausalLM

    config = DeepseekV2Config.preset(args.preset)
    try:
        DeepseekV2ForCausalLM(config).init_weights(seed=args.seed).save_pretrained(args.out)
    except OSError as error:  # --out cannot be written
        raise CliError(str(error)) from None
    print(f"wrote a randomly initialised {args.preset!r} model to {args.out}")


def prompt_of(directory: Path, args: argparse.Namespace) -> tuple[list[int], "ChatTokenizer | None"]:
    """The prompt's token ids; text goes through the chat template of a chat model unless --raw."""
    from model.tokenizer import ChatTokenizer, has_chat_template, load_tokenizer

    if args.prompt is None:
        tokenizer = ChatTokenizer.from_pretrained(directory) if load_tokenizer(directory) is not None else None
        return _parse_ids(args.prompt_ids), tokenizer
    if load_tokenizer(directory) is None:
        raise CliError(f"{directory} has no tokenizer.json; pass --prompt-ids instead of --prompt")
    tokenizer = ChatTokenizer.from_pretrained(directory)
    if args.raw or not has_chat_template(directory):
        return tokenizer.encode(args.prompt), tokenizer
    return tokenizer.encode_chat([{"role": "user", "content": args.prompt}], add_generation_prompt=True), tokenizer


def cmd_generate(args: argparse.Namespace) -> None:
    from model import DeepseekV2ForCausalLM

    directory = _model_dir(args.model)
    prompt_ids, tokenizer = prompt_of(directory, args)
    if args.max_tokens < 1:
        raise CliError("--max-tokens must be at least 1")
    eos_token_id = args.eos_token_id
    if eos_token_id is None and tokenizer is not None and args.prompt is not None and not args.raw:
        eos_token_id = tokenizer.eos_token_id  # a chat answer ends at the end-of-sequence token
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    model = DeepseekV2ForCausalLM.from_pretrained(directory)
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for t in prompt_ids):
        raise CliError(f"prompt token ids must be in [0, {vocab})")
    stats: dict = {}
    if args.expert_actors == 0:
        token_ids = model.generate([prompt_ids], args.max_tokens, eos_token_id=eos_token_id, **sampling)[0]
    else:
        token_ids, stats = generate_on_graph(directory, prompt_ids, args.max_tokens, eos_token_id, args, sampling)
    result = {"token_ids": token_ids, "expert_actors": args.expert_actors, **stats}
    if tokenizer is not None:
        result["text"] = tokenizer.decode(token_ids)
    if args.json:
        print(json.dumps(result))
    else:
        print(result.get("text", " ".join(map(str, token_ids))))


def generate_on_graph(
    directory: Path, prompt_ids: list[int], max_tokens: int, eos_token_id: int | None, args: argparse.Namespace,
    sampling: dict,
) -> tuple[list[int], dict]:
    """`generate --expert-actors K`: a graph on the embedded (or RAY_ADDRESS) cluster, torn down after."""
    import ray

    from cluster.graph import ActorGraph
    from cluster.spec import ClusterSpec

    chosen = {"transport": args.transport} if args.transport else {}
    spec = ClusterSpec(model=str(directory), name="moeray-cli", expert_actors=args.expert_actors, **chosen)
    graph = ActorGraph.create(spec)
    try:
        router = graph.routers[0]
        tokens = ray.get(router.generate.remote([prompt_ids], max_tokens, eos_token_id=eos_token_id, **sampling))[0]
        stats = ray.get(router.load_stats.remote())
    finally:
        graph.teardown()
    return tokens, {"transport": stats["transport"], "load": stats["layers"]}


def cmd_serve(args: argparse.Namespace) -> None:
    from serving.launch import serve_forever

    if args.expert_actors < 1 or args.routers < 1:
        raise CliError("--expert-actors and --routers must be at least 1")
    if args.gpus_per_actor is not None and args.gpus_per_actor < 0:
        raise CliError("--gpus-per-actor must be at least 0")
    serve_forever(_model_dir(args.model), args.expert_actors, args.routers, args.host, args.port, args.grpc_port,
                  args.api_key or [], args.name, args.served_model_name, args.gpus_per_actor)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import quickstart

    return quickstart(_model_dir(args.model) if args.model else None, args.expert_actors, args.max_tokens)


# Commands whose module parses its own arguments: (command words) -> (module with main(argv), help).
DELEGATED = {
    ("train", "sft"): ("jobs.sft", "pretraining / SFT: the arguments of `python -m jobs.sft`"),
    ("train", "grpo"): ("jobs.grpo", "GRPO (rollouts by the serving engine): the arguments of `python -m jobs.grpo`"),
    ("k8s", "render"): ("k8s.render", "print an overlay's Kubernetes manifests: the arguments of `python -m k8s.render`"),
}


def run_delegated(words: tuple[str, str], argv: list[str]) -> int:
    module, _ = DELEGATED[words]
    torch.set_grad_enabled(words[0] == "train")
    if words[0] == "k8s":
        return importlib.import_module(module).main(argv, prog="moeray " + " ".join(words))
    return importlib.import_module(module).main(argv) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeray", description="DeepSeek-V2 MoE serving and training on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="write a randomly initialised model folder")
    init.add_argument("--preset", default="tiny", choices=["tiny"])
    init.add_argument("--out", required=True)
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(func=cmd_init)

    gen = sub.add_parser("generate", help="generate tokens from a model folder")
    gen.add_argument("--model", required=True)
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", help="comma-separated token ids")
    prompt.add_argument("--prompt", help="text (needs tokenizer.json); a chat model's template is applied")
    gen.add_argument("--raw", action="store_true", help="encode --prompt as is, without the chat template")
    gen.add_argument("--max-tokens", type=int, default=16)
    gen.add_argument("--expert-actors", type=int, default=0, help="0 = one process, no Ray")
    gen.add_argument("--transport", choices=transport_names(), help="default: ClusterSpec's (socket)")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--eos-token-id", type=int, default=None)
    gen.add_argument("--json", action="store_true")
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="serve a model folder: OpenAI-compatible HTTP + gRPC on Ray Serve")
    srv.add_argument("--model", required=True)
    srv.add_argument("--expert-actors", type=int, default=2)
    srv.add_argument("--routers", type=int, default=1)
    srv.add_argument("--gpus-per-actor", type=float, default=None,
                     help="0 = CPU; default: the cluster's free GPUs shared out over the graph's actors, up to 1 each")
    srv.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--grpc-port", type=int, default=9000)
    srv.add_argument("--api-key", action="append", help="repeatable; also MOERAY_API_KEYS; default: a generated key")
    srv.add_argument("--name", default="moeray", help="actor-graph name (joins a running graph of that name)")
    srv.add_argument("--served-model-name", default=None, help="the model name clients use; default: folder name")
    srv.set_defaults(func=cmd_serve)

    quick = sub.add_parser("quickstart", help="embedded Ray + the bundled model + a few streamed OpenAI requests")
    quick.add_argument("--model", default=None, help="default: the bundled checkpoint")
    quick.add_argument("--expert-actors", type=int, default=2)
    quick.add_argument("--max-tokens", type=int, default=24)
    quick.set_defaults(func=cmd_quickstart)

    groups = {
        "train": sub.add_parser("train", help="training jobs on the actor graph (jobs/)").add_subparsers(required=True),
        "k8s": sub.add_parser("k8s", help="Kubernetes (KubeRay) manifests (k8s/)").add_subparsers(required=True),
    }
    for (group, name), (_, help_text) in DELEGATED.items():
        groups[group].add_parser(name, add_help=False, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if tuple(argv[:2]) in DELEGATED:
        return run_delegated(tuple(argv[:2]), argv[2:])
    args = build_parser().parse_args(argv)
    torch.set_grad_enabled(False)
    try:
        return args.func(args) or 0
    except CliError as error:
        print(f"moeray: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # SIGINT or SIGTERM; what the command started is already taken down
        print("moeray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
