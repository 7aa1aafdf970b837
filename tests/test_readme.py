"""What the README shows a new user stays true: its client example asks the bundled model a question
the model answers as the README says, and the Serve config it names serves that model on this machine
only, with a key from the environment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from jobs.data import arith_answer
from serving.app import AppArgs, build
from serving.keys import API_KEYS_ENV
from serving.model_info import resolve_model_dir

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_example_of(section: str) -> str:
    body = README.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_the_client_example_asks_the_bundled_model_what_it_answers():
    from model import DeepseekV2ForCausalLM
    from model.tokenizer import ChatTokenizer

    example = python_example_of("Serving")
    model_name = re.search(r'model="([^"]+)"', example).group(1)
    question = re.search(r'"content": "([^"]+)"', example).group(1)
    promised = re.search(r"print\(answer.*# (\S+)", example).group(1)
    folder = ROOT / "checkpoints" / model_name
    model, tokenizer = DeepseekV2ForCausalLM.from_pretrained(folder), ChatTokenizer.from_pretrained(folder)
    prompt = tokenizer.encode_chat([{"role": "user", "content": question}], add_generation_prompt=True)
    answer = tokenizer.decode(model.generate([prompt], 8, eos_token_id=tokenizer.eos_token_id)[0])
    a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", question).groups()
    assert answer == promised == arith_answer(int(a), op, int(b))


def test_the_tiny_serve_config_serves_the_chat_model_locally_with_a_key_from_the_environment(monkeypatch):
    config = yaml.safe_load((ROOT / "serving" / "configs" / "tiny.yaml").read_text())
    assert config["http_options"]["host"] == "127.0.0.1"
    (app,) = config["applications"]
    args = AppArgs.model_validate(app["args"])
    assert (resolve_model_dir(args.model) / "tokenizer_config.json").exists()  # a chat model
    assert args.require_api_key and args.api_keys == []  # keys never in the file
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    with pytest.raises(ValueError, match=API_KEYS_ENV):
        build(args)
    monkeypatch.setenv(API_KEYS_ENV, "sk-from-the-environment")
    build(args)
