"""Prompt formats and chat templates."""

import json
import os

import jinja2
import pytest

from psm.data import prompts, sources

# SmolLM2-135M-Instruct's chat template (tokenizer.chat_template in its GGUF).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_alpaca_templates():
    with_input = {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}
    p, r = prompts.alpaca(with_input)
    assert r == "Hello"
    assert p.startswith("Below is an instruction that describes a task, paired with an input")
    assert p.endswith("### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:\n")
    p, r = prompts.alpaca({"instruction": "Say {hi}.", "input": "", "output": "hi"})
    assert "### Input:" not in p and "paired with an input" not in p
    assert p.endswith("### Instruction:\nSay {hi}.\n\n### Response:\n")  # braces kept


def test_gsm8k_keeps_full_solution_and_final_answer():
    ex = {"question": "What is 2+3?", "answer": "2+3 = <<2+3=5>>5.\n#### 5"}
    p, r = prompts.gsm8k(ex)
    assert p == "Question: What is 2+3?\nAnswer:"
    assert r == " 2+3 = <<2+3=5>>5.\n#### 5"
    _, r2 = prompts.gsm8k(ex, keep_calculator=False)
    assert r2 == " 2+3 = 5.\n#### 5"


def test_math_and_humaneval():
    p, r = prompts.math({"problem": "Find $x$.", "solution": "So $x=\\boxed{2}$."})
    assert p == "Problem: Find $x$.\nSolution:" and r == " So $x=\\boxed{2}$."
    p, r = prompts.humaneval({"prompt": "def f():\n", "canonical_solution": "    return 1\n"})
    assert p + r == "def f():\n    return 1\n"


def test_glue_formats_and_label_words():
    p, r = prompts.format_example("sst2", {"sentence": "great film", "label": 1})
    assert p.startswith("Sentence: great film\n") and p.endswith("Answer:") and r == " positive"
    p, r = prompts.format_example("rte", {"sentence1": "A", "sentence2": "B", "label": 0})
    assert "Sentence 1: A\nSentence 2: B\n" in p and r == " yes"  # 0 = entailment
    assert prompts.format_example("rte", {"sentence1": "A", "sentence2": "B",
                                          "label": 1})[1] == " no"
    assert prompts.format_example("stsb", {"sentence1": "A", "sentence2": "B",
                                           "label": 3.8})[1] == " 3.8"
    assert prompts.format_example("cola", {"sentence": "x", "label": 0})[1] == " no"
    with pytest.raises(ValueError, match="no label.*hidden"):
        prompts.format_example("mrpc", {"sentence1": "A", "sentence2": "B", "label": -1})
    with pytest.raises(ValueError, match="no score"):
        prompts.format_example("stsb", {"sentence1": "A", "sentence2": "B", "label": -1.0})
    # The prompt alone works for unlabeled test examples.
    assert prompts.glue_prompt("mrpc", {"sentence1": "A", "sentence2": "B", "label": -1})


def test_every_task_has_a_format():
    assert set(sources.KNOWN_TASKS) <= set(prompts.PROMPT_FORMATS)
    with pytest.raises(ValueError, match="no prompt format for task 'squad'"):
        prompts.format_example("squad", {})


def test_formats_on_real_records(shared_data_dir):
    with open(os.path.join(shared_data_dir, "gsm8k", "test.jsonl")) as f:
        ex = json.loads(f.readline())
    p, r = prompts.gsm8k(ex)
    assert ex["question"] in p and r.rstrip().endswith("#### " + ex["answer"].split("#### ")[-1])


def test_chat_template_renders_like_chatml():
    msgs = [{"role": "user", "content": "Hi"}]
    out = prompts.apply_chat_template(msgs, SMOLLM2_TEMPLATE, add_generation_prompt=True)
    assert out == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained "
                   "by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                   "<|im_start|>assistant\n")
    p, r = prompts.chat_pair("What is 2+3?", "5", SMOLLM2_TEMPLATE)
    assert p.endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    assert r == "5<|im_end|>\n"
    p, _ = prompts.chat_pair("Q", "A", SMOLLM2_TEMPLATE, system="Be brief.")
    assert p.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and "SmolLM" not in p


@pytest.mark.oracle
def test_chat_template_matches_transformers():
    ctu = pytest.importorskip("transformers.utils.chat_template_utils")
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
                "{{ raise_exception('no tools') }}{% endif %}{{ m['role'] | upper }}: "
                "{{ m['content'] | trim }}\n{% if loop.index > 5 %}{% break %}{% endif %}"
                "{% endfor %}{{ {'a': '<b>'} | tojson }}"
                "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    convs = [[{"role": "system", "content": " sys "}, {"role": "user", "content": "x & <y>"}],
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]]
    for tpl in (template, SMOLLM2_TEMPLATE):
        for msgs in convs:
            for gen in (False, True):
                ours = prompts.apply_chat_template(msgs, tpl, add_generation_prompt=gen,
                                                   bos_token="<s>")
                ref = ctu.render_jinja_template([msgs], chat_template=tpl,
                                                add_generation_prompt=gen, bos_token="<s>")
                ref = ref[0][0] if isinstance(ref, tuple) else ref
                ref = ref[0] if isinstance(ref, list) else ref
                assert ours == ref


def test_chat_template_errors():
    with pytest.raises(ValueError, match="SmolLM2 tokenizer has no chat template"):
        prompts.chat_pair("Q", "A", None, owner="SmolLM2 tokenizer")
    with pytest.raises(ValueError, match="no chat template"):
        prompts.apply_chat_template([{"role": "user", "content": "x"}], "")
    with pytest.raises(jinja2.exceptions.TemplateError, match="only user"):
        prompts.apply_chat_template([{"role": "system", "content": "x"}],
                                    "{% if messages[0]['role'] != 'user' %}"
                                    "{{ raise_exception('only user') }}{% endif %}")
    with pytest.raises(ValueError, match=r"messages\[0\] must be a dict"):
        prompts.apply_chat_template(["hi"], SMOLLM2_TEMPLATE)
    # A template whose assistant turn rewrites the earlier text cannot be split.
    odd = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
           "{% if add_generation_prompt %}>>{% endif %}")
    with pytest.raises(ValueError, match="cannot be split"):
        prompts.chat_pair("Q", "A", odd)
    # The sandbox refuses attribute access to Python internals.
    with pytest.raises(jinja2.exceptions.SecurityError):
        prompts.apply_chat_template([{"role": "user", "content": "x"}],
                                    "{{ messages.__class__.__mro__ }}")
