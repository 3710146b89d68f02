"""How a problem becomes prompt token ids, for the student and (with a context) for the teacher.

Every component renders through here, so the actor's prompt ids, the evaluation's and the teacher's agree:
- A tokenizer with a chat template renders the conversation with it (generation prompt added) and the text is
  tokenised without extra special tokens (the template writes its own BOS if it wants one). The response ends at
  the template's end-of-turn token (`stop_token_id`; generation also stops on EOS: `stop_token_ids`), which is
  part of the response, so the learner trains it.
- Without a template (the demo's character models) a prompt is BOS + its raw text (`encode_prompt`), as before.

Context distillation (`TeacherPrompts`): the teacher sees a system prompt and/or few-shot turns the student does
not. Teachers score token ids, never text, so the teacher's prompt is made from the student's prompt ids by
swapping their head: every student prompt starts with the same ids (the student's system turn and the user
turn's header, `student_head`), and the teacher's prompt is `teacher_head` (its system turn, the few-shot
turns, the same header) followed by the rest of the student's ids. The response ids are never touched, and
`teacher_head` is a token prefix common to every teacher input, so a teacher can compute its KV cache once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from opd.config.scorer import TeacherContext
from opd.config.task import AdditionTask, JsonlTask
from opd.models.loading import encode_prompt
from opd.tasks import Problem

# User-turn contents whose renderings share exactly the ids that precede any user content: starting with a
# letter, a digit, a space and a newline, they stop the common prefix before whatever the first characters of a
# real prompt could merge with (a BPE's "\n\n" or "\n " tokens).
_PROBES = ("A", "7", " x", "\nx", "\n\nx", "x y")


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def uses_template(tokenizer, chat_template: bool) -> bool:
    """Whether prompts are rendered with the tokenizer's chat template: asked for (task.chat_template: auto) and
    there is one."""
    return chat_template and has_template(tokenizer)


def conversation(problem: Problem) -> list[dict[str, str]]:
    """The problem's turns as OpenAI-style messages, with the task's system prompt first if it has none."""
    turns = list(problem.messages) or [("user", problem.prompt)]
    if problem.system_prompt is not None and turns[0][0] != "system":
        turns.insert(0, ("system", problem.system_prompt))
    return [{"role": r, "content": c} for r, c in turns]


def render_ids(tokenizer, messages: list[dict[str, str]], generation_prompt: bool = True) -> list[int]:
    """Ids of a conversation rendered with the tokenizer's chat template. The text is tokenised without adding
    special tokens: the template already wrote the ones it wants (a second BOS would shift every position)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _raw_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """BOS + system text + the user text, each tokenised on its own (so a context spliced in as ids tokenises
    the same way); a conversation of several turns has no raw form (refused at load by opd.tasks)."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) != 1:
        raise ValueError(
            f"a conversation of {len(turns)} turns needs a chat template, and this tokenizer has none; "
            "give single-turn prompts or use a model with a chat template"
        )
    ids = encode_prompt(tokenizer, system[0]) if system else encode_prompt(tokenizer, "")
    return ids + tokenizer(turns[0]["content"], add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, problem: Problem) -> list[int]:
    """The student's prompt ids for a problem: its chat rendered with the template (generation prompt added), or
    BOS + raw text without one (exactly `encode_prompt` for a plain prompt)."""
    messages = conversation(problem)
    if uses_template(tokenizer, problem.chat_template):
        return render_ids(tokenizer, messages)
    if len(messages) == 1:
        return encode_prompt(tokenizer, problem.prompt)
    return _raw_ids(tokenizer, messages)


def stop_token_id(tokenizer, chat_template: bool) -> int:
    """The token a response ends with: the template's end-of-turn token (ChatML's `<|im_end|>`, Llama 3's
    `<|eot_id|>`), found as the first token the template writes after an assistant turn's content; EOS without
    a template, or when the template ends a turn with no special token."""
    if not uses_template(tokenizer, chat_template):
        return tokenizer.eos_token_id
    marker = "\u2063opd\u2063"  # invisible separators: text no template writes on its own
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    after = text[text.rindex(marker) + len(marker) :] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return ids[0] if ids and ids[0] in special else tokenizer.eos_token_id


def stop_token_ids(tokenizer, chat_template: bool) -> tuple[int, ...]:
    """Every token a response may end with: the end-of-turn token first, then EOS when it is another token.

    Why both: a chat model whose end of turn is not its EOS (Llama 3's `<|eot_id|>` against `<|end_of_text|>`,
    a ChatML template on a `</s>` tokenizer) still emits EOS now and then; a sampler that stops on one id only
    would run past it to `max_new_tokens`, and the learner would train on text after the end. The first id is
    the one a context's worked turns are closed with (`stop_token_id`)."""
    end = stop_token_id(tokenizer, chat_template)
    eos = tokenizer.eos_token_id
    return (end,) if eos is None or eos == end else (end, eos)


def _common_prefix(seqs: Sequence[list[int]]) -> list[int]:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return first[:i]
    return first[:n]


@dataclass(frozen=True)
class TeacherPrompts:
    """Turns a student's prompt ids into the teacher's: `teacher_head + prompt[len(student_head):]`.

    `student_head` is what every student prompt of the task starts with and `teacher_head` what every teacher
    input starts with (the shared prefix a teacher may cache). Without a context they are equal and the teacher's
    ids are the student's."""

    student_head: tuple[int, ...]
    teacher_head: tuple[int, ...]

    @property
    def has_context(self) -> bool:
        return self.student_head != self.teacher_head

    def teacher_ids(self, prompt: Sequence[int]) -> list[int]:
        """The teacher's prompt ids for a student's prompt; ValueError when the prompt does not start with the
        task's head (a JSONL conversation with its own system turn, under a context that replaces it)."""
        prompt = list(prompt)
        if not self.has_context:
            return prompt
        n = len(self.student_head)
        if tuple(prompt[:n]) != self.student_head:
            raise ValueError(
                "the student's prompt does not start with the task's system turn, so the teacher's context cannot "
                "be put in its place (a JSONL line with its own system message?); with scorer.context, give the "
                "system prompt as task.system_prompt or scorer.context.system_prompt instead"
            )
        return [*self.teacher_head, *prompt[n:]]

    @classmethod
    def build(
        cls, tokenizer, task: AdditionTask | JsonlTask, context: TeacherContext | None
    ) -> TeacherPrompts:
        """The heads for a task and a teacher context, checked to splice exactly like a full rendering."""
        templated = uses_template(tokenizer, task.chat_template == "auto")
        if not templated:
            return _raw_heads(tokenizer, task.system_prompt, context)
        system = [] if task.system_prompt is None else [{"role": "system", "content": task.system_prompt}]
        teacher = list(system)
        if context is not None:
            if context.system_prompt is not None:
                teacher = [{"role": "system", "content": context.system_prompt}]
            for shot in context.few_shot:
                teacher += [
                    {"role": "user", "content": shot.user},
                    {"role": "assistant", "content": shot.assistant},
                ]

        def probes(head):
            return [render_ids(tokenizer, [*head, {"role": "user", "content": p}]) for p in _PROBES]

        student_probes, teacher_probes = probes(system), probes(teacher)
        heads = cls(tuple(_common_prefix(student_probes)), tuple(_common_prefix(teacher_probes)))
        for s, t in zip(student_probes, teacher_probes, strict=True):
            if heads.teacher_ids(s) != t:
                raise ValueError(
                    "scorer.context: this chat template does not render the context as a prefix the student's "
                    "turns can follow unchanged, so the teacher's ids cannot be made from the student's; "
                    "use a template that renders turn by turn (ChatML, Llama 3) or drop scorer.context"
                )
        return heads


def _raw_heads(tokenizer, system_prompt: str | None, context: TeacherContext | None) -> TeacherPrompts:
    """Without a chat template: the student's head is BOS + its system text; the teacher's is BOS + the context's
    system text (or the student's) + each few-shot user text and answer, the answer ended by EOS as a response
    is. Every piece is tokenised on its own, as `_raw_ids` does."""

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    student = encode_prompt(tokenizer, system_prompt or "")
    if context is None:
        return TeacherPrompts(tuple(student), tuple(student))
    system = context.system_prompt if context.system_prompt is not None else system_prompt
    teacher = encode_prompt(tokenizer, system or "")
    for shot in context.few_shot:
        teacher += ids(shot.user) + ids(shot.assistant) + [tokenizer.eos_token_id]
    unknown = tokenizer.unk_token_id
    if unknown is not None and unknown in teacher:
        raise ValueError(
            "scorer.context has characters the tokenizer does not know (they became its unknown token); "
            "write the context with the task's characters only"
        )
    return TeacherPrompts(tuple(student), tuple(teacher))
