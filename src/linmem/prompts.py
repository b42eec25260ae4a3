"""Every prompt text linmem sends to a model, in one place.

The LM reader's prompts share one system message and one memory intro, so a single state snapshot
(or server prefix-cache entry) serves reads, rankings and windowed reads alike. After the memory
comes the fixed instruction of the kind of read (its "stem", also cached) and last the question,
so a read processes only the question's few tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from .engines.base import Prompt

MEMORY_SYSTEM = (
    "You are the long-term memory of an AI agent. You are given the agent's memory: a chronological "
    "log of video clips, conversation sessions and notes. Each block starts with a tag such as "
    "[CLIP 12 | 06:00-06:30]. Answer using only what the memory says. Be concise and specific "
    "(names, objects, places, times), and cite the clips you used as CLIP <id>."
)

MEMORY_INTRO = "Memory:\n"

READ_STEM = (
    "\nAnswer the question below from the memory in a few sentences, citing the clips you used as "
    "CLIP <id>. If the memory does not contain the answer, say so.\n"
)
READ_QUERY = "Question: {query}"

RANK_STEM = (
    "\nWhich clips are most relevant to the query below? List their ids, most relevant first, in "
    "the form: CLIP <id>, CLIP <id>, ... Output only the list.\n"
)
RANK_QUERY = "Query: {query}\nList at most {k} clips."

COMBINE_INTRO = (
    "The memory was too long to read at once, so it was read in windows. "
    "Here is what each window said about the question:\n"
)


def read_prompt(memory: Sequence[str], query: str) -> Prompt:
    return Prompt(MEMORY_SYSTEM, MEMORY_INTRO, memory, READ_STEM, READ_QUERY.format(query=query.strip()))


def rank_prompt(memory: Sequence[str], query: str, k: int) -> Prompt:
    return Prompt(MEMORY_SYSTEM, MEMORY_INTRO, memory, RANK_STEM, RANK_QUERY.format(query=query.strip(), k=k))


def combine_prompt(window_answers: Sequence[tuple[str, str]], query: str) -> Prompt:
    """The final step of a windowed read: the windows' answers (labelled by the clips each
    window covered) take the place of the memory."""
    parts = [
        f"[WINDOW {i + 1} | {label}]\n{answer.strip()}\n\n"
        for i, (label, answer) in enumerate(window_answers)
    ]
    return Prompt(MEMORY_SYSTEM, COMBINE_INTRO, parts, READ_STEM, READ_QUERY.format(query=query.strip()))


# The M3-Agent controller (ByteDance-Seed/m3-agent, m3_agent/control.py), verbatim: the system
# message, the instruction appended to the last user message before every generation, the suffix
# that forces an answer in the last round, and the search-result turns.

M3_SYSTEM = (
    "You are given a question and some relevant knowledge. Your task is to reason about whether the "
    "provided knowledge is sufficient to answer the question. If it is sufficient, output [Answer] "
    "followed by the answer. If it is not sufficient, output [Search] and generate a query that will "
    "be encoded into embeddings for a vector similarity search. The query will help retrieve "
    "additional information from a memory bank.\n\nQuestion: {question}"
)

M3_INSTRUCTION = (
    "\n\nOutput the answer in the format:\n"
    "Action: [Answer] or [Search]\n"
    "Content: {content}\n\n"
    "If the answer cannot be derived yet, the {content} should be a single search query that would help "
    "retrieve the missing information. The search {content} needs to be different from the previous.\n"
    "You can get the mapping relationship between character ID and name by using search query such as: "
    '"What is the name of <character_{i}>" or "What is the character id of {name}".\n'
    "After obtaining the mapping, it is best to use character ID instead of name for searching.\n"
    "If the answer can be derived from the provided knowledge, the {content} is the specific answer to "
    "the question. Only name can appear in the answer, not character ID like <character_{i}>."
)

M3_LAST_ROUND = (
    "\n(The Action of this round must be [Answer]. If there is insufficient information, "
    "you can make reasonable guesses.)"
)

M3_KNOWLEDGE = "Searched knowledge: "

# M3-Agent allowed 1,024 tokens a round for a reasoning model; a reply in the format above is a
# few dozen, and it ends at its Content line (`linmem.agent.reply_done`), so this bounds only a
# rambling one.
CONTROLLER_MAX_TOKENS = 256

M3_EMPTY_RESULT = "\n(The search result is empty. Please try searching from another perspective.)"


def m3_system(question: str) -> str:
    return M3_SYSTEM.format(question=question)


# M3-Bench's judge (mmagent/prompts.py `prompt_agent_verify_answer_referencing`, sent by
# control.py's eval_answer with this system message), verbatim, tabs and bullets included.

JUDGE_SYSTEM = "You are an expert in video understanding."

JUDGE_PROMPT = (
    "You are provided with a question, a ground truth answer, and an answer from an agent model. Your "
    "task is to determine whether the ground truth answer can be logically inferred from the agent's "
    "answer, in the context of the question.\n\n"
    "Do not directly compare the surface forms of the agent answer and the ground truth answer. "
    "Instead, assess whether the meaning expressed by the agent answer supports or implies the ground "
    'truth answer. If the ground truth can be reasonably derived from the agent answer, return "Yes". '
    'If it cannot, return "No".\n\n'
    "Important notes:\n"
    "\t•\tDo not require exact wording or matching structure.\n"
    "\t•\tSemantic inference is sufficient, as long as the agent answer entails or implies the meaning "
    "of the ground truth answer, given the question.\n"
    '\t•\tOnly return "Yes" or "No", with no additional explanation or formatting.\n\n'
    "Input fields:\n"
    "\t•\tquestion: the question asked\n"
    "\t•\tground_truth_answer: the correct answer\n"
    "\t•\tagent_answer: the model's answer to be evaluated\n\n"
    "Now evaluate the following input:\n\n"
    "Input:\n"
    "\t•\tquestion: {question}\n"
    "\t•\tground_truth_answer: {ground_truth_answer}\n"
    "\t•\tagent_answer: {agent_answer}\n\n"
    "Output ('Yes' or 'No'):"
)


def judge_messages(question: str, gold: str, prediction: str) -> list[dict[str, str]]:
    user = JUDGE_PROMPT.format(question=question, ground_truth_answer=gold, agent_answer=prediction)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


# Memorization: one clip's frames (and speech) to a caption, the raw memory of a video.

CAPTION_PROMPT = (
    "These {frames} frames come from clip {clip} of a video, {start} to {end}, in time order.{speech}\n"
    "Describe what happens in the clip as a list of atomic events, one short sentence per line, in "
    'the order they happen. Name people by a consistent visible description (for example "the man '
    'in the grey hoodie") and use the same description every time the same person appears; do not '
    "invent names or use pronouns alone. Include places, objects, actions, any visible text, and who "
    "says what when speech is given. Output only the lines."
)
CAPTION_SPEECH = '\nSpeech heard in the clip: "{transcript}"'


def caption_prompt(clip: int, start: str, end: str, frames: int, transcript: str | None) -> str:
    speech = CAPTION_SPEECH.format(transcript=transcript.strip()) if transcript and transcript.strip() else ""
    return CAPTION_PROMPT.format(frames=frames, clip=clip, start=start, end=end, speech=speech)


# Structured memory (`linmem.structured`): one clip's caption to M3-Agent-style episodic and
# semantic lines with entity tags.

EXTRACTION_PROMPT = """\
You turn the caption of one video clip into structured memory.

Entities already known from earlier clips (tag, then what is known about it):
{entities}

Caption of clip {clip}:
{caption}

Rules:
- Refer to every person only by an entity tag such as <person_1>: never by a pronoun or an invented \
name.
- When the caption describes a known entity, reuse its known tag.
- Give each new entity a new tag <person_N> with a fresh N, starting at {next_n}.
- If two tags name the same entity (for example <face_3> and <voice_2>), list the pair under \
"equivalences".
- "episodic": the events of this clip in time order, one atomic event per line.
- "semantic": character attributes, relationships between characters and general knowledge the \
clip shows, one per line.

Answer with one JSON object and nothing else:
{{"episodic": ["..."], "semantic": ["..."], "equivalences": [["<person_1>", "<face_2>"]]}}"""

EXTRACTION_RETRY = "That answer could not be used ({error}). Answer again with only the JSON object."
