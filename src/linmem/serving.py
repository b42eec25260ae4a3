"""Command lines for serving a linear-attention memory model with prefix caching.

A server cannot hand out a request's recurrent state, so the OpenAI-compatible engine relies on
the server's automatic prefix caching: every read of one memory sends the same prompt prefix
(system message, memory, instruction) and the server resumes from its cached state at the last
block boundary it checkpointed. For hybrid models that needs, in vLLM, prefix caching with the
Mamba cache in "align" mode (the default once prefix caching is on for models without full
Mamba prefix-caching support, Kimi-Linear among them) and prompt-token details in the usage (so
`tokens.cached` shows the hits); in SGLang, the Mamba radix cache with the extra-buffer strategy.
Hits happen at block granularity (vLLM raises the block size to hundreds of tokens for
hybrids), so a memory shorter than one block is never served from cache.

The README shows the output of these functions, and a test keeps the two identical.
"""

from __future__ import annotations


def vllm_command(
    model: str,
    *,
    tensor_parallel: int = 1,
    max_model_len: int | None = None,
    port: int = 8000,
    trust_remote_code: bool = False,
) -> list[str]:
    """`vllm serve` with prefix caching for hybrid models and cached-token counts in responses."""
    cmd = ["vllm", "serve", model, "--port", str(port)]
    if tensor_parallel > 1:
        cmd += ["--tensor-parallel-size", str(tensor_parallel)]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if trust_remote_code:
        cmd.append("--trust-remote-code")
    cmd += ["--enable-prefix-caching", "--mamba-cache-mode", "align", "--enable-prompt-tokens-details"]
    return cmd


def sglang_command(
    model: str,
    *,
    tensor_parallel: int = 1,
    context_length: int | None = None,
    port: int = 30000,
    trust_remote_code: bool = False,
) -> list[str]:
    """`sglang.launch_server` with the Mamba radix cache's extra-buffer strategy. Kimi-Linear's
    prefix hits are only correct in SGLang releases after mid-July 2026 (sgl-project/sglang PR
    #31474); check the cached tokens with `linmem bench --endpoint`."""
    cmd = ["python3", "-m", "sglang.launch_server", "--model-path", model, "--port", str(port)]
    if tensor_parallel > 1:
        cmd += ["--tp", str(tensor_parallel)]
    if context_length:
        cmd += ["--context-length", str(context_length)]
    if trust_remote_code:
        cmd.append("--trust-remote-code")
    cmd += ["--mamba-scheduler-strategy", "extra_buffer"]
    return cmd


def shell(cmd: list[str]) -> str:
    return " ".join(cmd)
