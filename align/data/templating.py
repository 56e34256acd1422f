"""Chat templating and prompt-masked labels.

A conversation is rendered with the tokenizer's own chat template, one turn at a time, and cut
into segments: the prompt up to each assistant turn (not trained) and the assistant turn itself
(trained, through its end-of-turn token). Each segment is tokenized on its own and the ids are
concatenated, so by construction:

- the ids of the prompt (the conversation before an assistant turn, with the generation prompt)
  are a prefix of the full ids, and equal `encode_prompt` of that prompt, which is what the
  rollout engines feed the model;
- every assistant turn is trained, not only the last one, each with its end-of-turn token, even
  when pad == eos (SmolLM2): labels come from the segment structure, never from token ids.

If the template is not prefix-stable (rendering a longer conversation changes the text of an
earlier part), turn boundaries cannot be found and we raise rather than train on everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from align.data.formats import Message, RowError
from align.tokens import IGNORE_INDEX

# A plain ChatML template for tokenizers that ship none (`model.chat_template: chatml`).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Tokens that end a turn in common templates; those present in a vocabulary count as end-of-turn.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


class TemplateError(ValueError):
    """The chat template does not let us find turn boundaries."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_length: int  # tokens before the first assistant turn (with the generation prompt)
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def setup_chat_template(tokenizer, chat_template: str | None) -> None:
    """Give the tokenizer a template: the recipe's if set, else its own; fail if it has none."""
    if chat_template == "chatml":
        tokenizer.chat_template = CHATML_TEMPLATE
    elif chat_template:
        tokenizer.chat_template = Path(chat_template).read_text(encoding="utf-8")
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "the tokenizer has no chat template; set model.chat_template to 'chatml' or to a .jinja file"
        )


def end_of_turn_ids(tokenizer) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab and token in tokenizer.all_special_tokens:
            ids.add(vocab[token])
    return ids


def control_token_texts(tokenizer) -> list[str]:
    """The spellings of the tokenizer's control tokens; computed once per file, not per row."""
    specials = {t for t in tokenizer.all_special_tokens if len(t) > 1}
    specials |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special and len(t.content) > 1}
    return sorted(specials)


def check_no_special_tokens(messages: list[Message], specials: list[str]) -> None:
    """Text that spells a control token (say '<|im_end|>') would be tokenized as that token: a
    turn could end mid-answer or a user could forge an assistant turn. Such rows are refused."""
    for index, message in enumerate(messages):
        for token in specials:
            if token in message["content"]:
                raise RowError(
                    f"messages[{index}].content", f"text contains the control token {token!r}", "special_token_in_text"
                )


def _render(tokenizer, messages: list[Message], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _needs_bos(tokenizer, rendered: str) -> bool:
    """True when the tokenizer adds a BOS by itself and the template did not render one."""
    bos = tokenizer.bos_token
    if bos is None or rendered.startswith(bos):
        return False
    return tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_prompt(tokenizer, messages: list[Message]) -> list[int]:
    """Ids the model sees before it answers: the conversation plus the generation prompt."""
    text = _render(tokenizer, messages, generation_prompt=True)
    bos = [tokenizer.bos_token_id] if _needs_bos(tokenizer, text) else []
    return bos + _tokens(tokenizer, text)


def encode_conversation(
    tokenizer, messages: list[Message], max_length: int, eot_ids: set[int] | None = None
) -> Encoded:
    """Token ids and labels for one conversation; labels are -100 except on assistant turns.

    Raises RowError when nothing trainable survives truncation, TemplateError when turn
    boundaries cannot be found.
    """
    eot_ids = end_of_turn_ids(tokenizer) if eot_ids is None else eot_ids
    if messages[0]["role"] == "assistant":
        raise RowError(
            "messages[0].role",
            "the conversation starts with an assistant turn: there is no prompt to answer",
            "assistant_first",
        )
    last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[: last_assistant + 1]  # turns after the last answer train nothing

    input_ids: list[int] = []
    labels: list[int] = []
    prompt_length = None
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = _render(tokenizer, messages[:index], generation_prompt=True)
        full_text = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not prompt_text.startswith(rendered) or not full_text.startswith(prompt_text):
            raise TemplateError(
                "the chat template is not prefix-stable (rendering more turns changes earlier text), so "
                "assistant turns cannot be located; use a template that renders turns independently"
            )
        if not input_ids and _needs_bos(tokenizer, prompt_text):
            input_ids.append(tokenizer.bos_token_id)
            labels.append(IGNORE_INDEX)
        prompt_ids = _tokens(tokenizer, prompt_text[len(rendered) :])
        input_ids += prompt_ids
        labels += [IGNORE_INDEX] * len(prompt_ids)
        if prompt_length is None:
            prompt_length = len(input_ids)

        answer_ids = _tokens(tokenizer, full_text[len(prompt_text) :])
        ends = [i for i, tok in enumerate(answer_ids) if tok in eot_ids]
        if ends:
            trained = ends[-1] + 1  # through the end-of-turn token; what follows it (a newline) is not trained
        elif index == last_assistant and tokenizer.eos_token_id is not None:
            # The template closes turns with no end token: add EOS to the last answer so the model
            # learns to stop (earlier turns keep the template's text, so later prompts stay prefixes).
            answer_ids = answer_ids + [tokenizer.eos_token_id]
            trained = len(answer_ids)
        else:
            trained = len(answer_ids)
        input_ids += answer_ids
        labels += answer_ids[:trained] + [IGNORE_INDEX] * (len(answer_ids) - trained)
        rendered = full_text

    truncated = len(input_ids) > max_length
    if truncated:
        if prompt_length >= max_length:
            raise RowError(
                "messages", f"prompt is {prompt_length} tokens, max_length is {max_length}", "prompt_too_long"
            )
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    encoded = Encoded(input_ids, labels, prompt_length, truncated)
    if encoded.trained_tokens == 0:
        raise RowError("messages", "no trained tokens left after truncation", "no_trained_tokens")
    return encoded
