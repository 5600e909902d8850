"""Sandboxed chat template rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kvforge.chat_template import _compile, render_chat
from kvforge.errors import ConfigError, InputTypeError
from kvforge.loader import load_model
from tiny_models import TINY_CHAT_TEMPLATE, real_model_path

REFERENCE = json.loads((Path(__file__).parent / "data" / "smollm2_fixed32.json").read_text())
# tokenizer.chat_template of SmolLM2-135M-Instruct (also checked against the GGUF below).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You are a helpful AI assistant."},
    {"role": "user", "content": "What is the capital of France? Answer very briefly."},
]


def test_smollm2_template_renders_reference_prompt():
    assert render_chat(SMOLLM2_TEMPLATE, MESSAGES) == REFERENCE["prompt_text"]


def test_smollm2_default_system_prompt_and_no_generation_prompt():
    out = render_chat(SMOLLM2_TEMPLATE, MESSAGES[1:], add_generation_prompt=False)
    assert out.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert out.endswith("briefly.<|im_end|>\n")


def test_real_gguf_template_matches():
    model = load_model(real_model_path())
    assert model.chat_template == SMOLLM2_TEMPLATE
    out = render_chat(model.chat_template, MESSAGES, bos_token=model.bos_token,
                      eos_token=model.eos_token)
    assert out == REFERENCE["prompt_text"]


def test_tiny_template_and_special_tokens():
    out = render_chat(TINY_CHAT_TEMPLATE, MESSAGES[1:])
    assert out == ("<|bos|>user\nWhat is the capital of France? Answer very briefly.<|eos|>\n"
                   "<|bos|>assistant\n")
    tpl = "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"
    assert render_chat(tpl, MESSAGES, bos_token="<s>", eos_token="</s>") == (
        "<s>You are a helpful AI assistant.</s>")
    assert render_chat(tpl, MESSAGES) == "You are a helpful AI assistant."


def test_extra_variables_tojson_and_loopcontrols():
    tpl = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
           "{{ m | tojson }}{% endfor %}|{{ tools | tojson }}")
    out = render_chat(tpl, [{"role": "user", "content": "café <b>"}] * 2, tools=[{"x": 1}])
    assert out == '{"role": "user", "content": "café <b>"}|[{"x": 1}]'


def test_compiled_templates_are_cached():
    assert _compile(SMOLLM2_TEMPLATE) is _compile(SMOLLM2_TEMPLATE)


def _payloads(target: Path) -> list[str]:
    cmd = f"touch {target}"
    return [
        "{{ self.__init__.__globals__.__builtins__.__import__('os').system('" + cmd + "') }}",
        "{{ lipsum.__globals__['os'].popen('" + cmd + "').read() }}",
        "{{ lipsum.__globals__.os.system('" + cmd + "') }}",
        "{{ cycler.__init__.__globals__.os.popen('" + cmd + "').read() }}",
        "{{ joiner.__init__.__globals__.os.system('" + cmd + "') }}",
        "{{ namespace.__init__.__globals__.os.system('" + cmd + "') }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{% for m in messages %}{{ m.__class__.__base__.__subclasses__() }}{% endfor %}",
        "{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('"
        + cmd + "') }}",
        "{{ messages.append({'role': 'x'}) }}",
        "{{ messages[0].update(role='admin') }}",
    ]


@pytest.mark.a6(9)
def test_template_injection_payloads_are_blocked(tmp_path):
    target = tmp_path / "pwned"
    for payload in _payloads(target):
        with pytest.raises(ConfigError, match="chat template error"):
            render_chat(payload, MESSAGES)
        assert not target.exists(), payload


@pytest.mark.a6(9)
def test_template_errors_become_config_errors():
    with pytest.raises(ConfigError, match="chat template error: roles must alternate"):
        render_chat("{{ raise_exception('roles must alternate') }}", MESSAGES)
    with pytest.raises(ConfigError, match="chat template error"):
        render_chat("{% for m in messages %}", MESSAGES)
    with pytest.raises(ConfigError, match="chat template error"):
        render_chat("{{ 1 / 0 }}", MESSAGES)
    with pytest.raises(ConfigError, match="chat template error"):
        render_chat("{{ messages[9]['content'] }}", MESSAGES)


@pytest.mark.parametrize("messages,err,match", [
    ("hello", InputTypeError, "messages must be a list"),
    ({"role": "user", "content": "x"}, InputTypeError, "messages must be a list"),
    ([], ConfigError, "at least one message"),
    (["hello"], InputTypeError, r"messages\[0\] must be a dict"),
    ([{"content": "x"}], ConfigError, r"messages\[0\] has no 'role'"),
    ([{"role": "user"}], ConfigError, r"messages\[0\] has no 'content'"),
    ([{"role": "user", "content": 3}], InputTypeError, r"messages\[0\]\['content'\] must be a str"),
    ([{"role": None, "content": "x"}], InputTypeError, r"messages\[0\]\['role'\] must be a str"),
])
def test_message_validation(messages, err, match):
    with pytest.raises(err, match=match):
        render_chat(SMOLLM2_TEMPLATE, messages)


def test_template_must_be_str():
    with pytest.raises(InputTypeError):
        render_chat(None, MESSAGES)  # type: ignore[arg-type]
