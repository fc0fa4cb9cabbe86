"""The `lmforge generate` verb: prompts from the command line or a file, outputs printed as they come.

The decoding itself is lmforge.infer.generate (sampling, streaming, beam search) and lmforge.infer.speculative
(with --draft, or --speculative ngram); the model comes from lmforge.loader.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

from lmforge.infer.generate import beam_search, continuation_text, end_tokens, generate, prompt_tokens, stream
from lmforge.infer.sampling import SamplingParams
from lmforge.loader import load


def print_outputs(
    model,
    tokenizer,
    prompts: list[list[int]],
    params: SamplingParams,
    streaming: bool,
    beam_width: int,
    length_penalty: float,
    out=None,
) -> None:
    """Run generation and print it: text deltas as they come for one output, else each output in order."""
    out = sys.stdout if out is None else out
    decode = tokenizer.decode if tokenizer is not None else (lambda ids: " ".join(map(str, ids)))
    if beam_width > 0:
        eos = None if params.ignore_eos else end_tokens(tokenizer)
        for i, prompt in enumerate(prompts):
            beams = beam_search(model, prompt, beam_width, params.max_tokens, length_penalty, eos)
            for j, (tokens, score) in enumerate(beams[: params.n]):
                if len(prompts) > 1 or params.n > 1:
                    print(f"--- prompt {i} beam {j} (score {score:.4f}) ---", file=out)
                print(decode(tokens), file=out, flush=True)
        return
    if streaming and len(prompts) == 1 and params.n == 1 and params.logprobs is None and tokenizer is not None:
        for ev in stream(model, prompts, params, tokenizer=tokenizer):
            print(ev.text, end="", file=out, flush=True)
        print(file=out)
        return
    for c in generate(model, prompts, params, tokenizer=tokenizer):
        text = c.text if c.text is not None else decode(c.tokens)
        if params.logprobs is not None:
            lps = [{"token": lp.token, "logprob": lp.logprob, "top": lp.top} for lp in c.logprobs or []]
            print(
                json.dumps(
                    {
                        "prompt": c.prompt_index,
                        "sample": c.sample_index,
                        "text": text,
                        "tokens": c.tokens,
                        "finish_reason": c.finish_reason,
                        "logprobs": lps,
                    }
                ),
                file=out,
                flush=True,
            )
            continue
        if len(prompts) > 1 or params.n > 1:
            print(f"--- prompt {c.prompt_index} sample {c.sample_index} ---", file=out)
        print(text, file=out, flush=True)


# The list default is what the CLI shows and passes (lmforge.cli); nothing mutates it.
def generate_command(
    model: str,
    prompt: str = "",
    max_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    stop: list[str] = [],  # noqa: B006
    ignore_eos: bool = False,
    seed: int | None = None,
    n: int = 1,
    logprobs: int | None = None,
    batch_file: str | None = None,
    stream: bool = True,
    beam_width: int = 0,
    length_penalty: float = 1.0,
    tokenizer: str | None = None,
    dtype: Literal["float32", "bfloat16"] = "float32",
    quantize: Literal["int8", "int4"] | None = None,
    draft: str | None = None,
    speculative: Literal["ngram"] | None = None,
    num_speculative_tokens: int = 4,
    adapter: str | None = None,
    controls: str | None = None,
) -> int:
    """Generate text from a model folder, a Hugging Face folder or a llama2.c file, streaming it as it comes.

    Args:
        model: model folder (config.json + model.safetensors + tokenizer), or a preset name for random weights.
        prompt: text to continue; empty starts from the tokenizer's BOS/EOS token.
        max_tokens: new tokens per output at most.
        temperature: sampling temperature; 0 is greedy decoding.
        top_k: sample only from the k most likely tokens; 0 keeps all.
        top_p: nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1].
        min_p: drop tokens less likely than this fraction of the most likely one, in [0, 1].
        repetition_penalty: > 1 discourages tokens already in the prompt or output (1 disables it).
        presence_penalty: subtracted once from the logit of every token already generated, in [-2, 2].
        frequency_penalty: subtracted per occurrence of a token in the output, in [-2, 2].
        stop: strings that end the output (the output is cut before them).
        ignore_eos: keep generating past the end-of-text token.
        seed: random seed for reproducible sampling.
        n: outputs per prompt (with beam search: the best beams to print).
        logprobs: print JSON lines with each token's logprob and this many top alternatives.
        batch_file: file with one prompt per line; outputs are printed in the same order.
        stream: print text as it is generated (single prompt, single sample).
        beam_width: beam search with this many beams instead of sampling; 0 samples.
        length_penalty: beam scores divide by length ** length_penalty.
        tokenizer: tokenizer.json or folder to use instead of the model folder's own.
        dtype: weights and activations dtype.
        quantize: quantize the weights on load: int8 (per-channel scales) or int4 (GGUF Q4_0's 32-value blocks).
        draft: a smaller model sharing the tokenizer: speculative decoding (one prompt, one sample at a time).
        speculative: "ngram": speculative decoding by prompt lookup, no draft model (proposals copy what followed
            the last few tokens earlier in the prompt or output; fast where the output repeats the input).
        num_speculative_tokens: tokens the draft proposes per target forward (prompt lookup: at most).
        adapter: a LoRA adapter folder (from `lmforge finetune --method lora`) merged into the model on load.
        controls: banned phrases and word logit biases (JSON or text file, see lmforge.infer.controls); how often
            each fired is printed to stderr as a JSON line.
    """
    spec = None
    if controls is not None:
        from lmforge.infer.controls import Controls, ControlsError, load_controls

        if draft is not None or speculative is not None or beam_width > 0:
            raise ControlsError(
                "--controls works with sampling and greedy decoding, not with --draft, --speculative or --beam-width"
            )
        spec = load_controls(controls)
    loaded = load(model, dtype=dtype, quantize=quantize, adapter=adapter, tokenizer=tokenizer)
    net, tok = loaded.model, loaded.tokenizer
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        stop=list(stop),
        ignore_eos=ignore_eos,
        seed=seed,
        n=n,
        logprobs=logprobs,
    )
    guard = Controls(spec, tok, net.config.vocab_size).attach(params) if spec is not None else None
    if batch_file is not None:
        path = Path(batch_file)
        if not path.is_file():
            raise FileNotFoundError(f"batch file {path} does not exist")
        texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise ValueError(f"batch file {path} holds no prompts (one per line expected)")
    else:
        texts = [prompt]
    prompts = [prompt_tokens(tok, t) for t in texts]
    if draft is not None or speculative is not None:
        from lmforge.infer.speculative import NgramIndex, SpeculativeError, speculative_generate

        if draft is not None and speculative is not None:
            raise SpeculativeError(
                "--draft and --speculative ngram are two ways to draft: give one", param="speculative"
            )
        draft_net = load(draft, dtype=dtype, quantize=quantize, tokenizer=tokenizer).model if draft else None
        for prompt_ids in prompts:
            proposer = draft_net if draft_net is not None else NgramIndex()
            tokens, stats = speculative_generate(
                net,
                proposer,
                prompt_ids,
                params,
                k=num_speculative_tokens,
                eos_id=None if params.ignore_eos else end_tokens(tok),
            )
            print(continuation_text(tok, prompt_ids, tokens) if tok is not None else tokens, flush=True)
            print(
                json.dumps(
                    {
                        "acceptance_rate": round(stats["acceptance_rate"], 3),
                        "tokens_per_round": round(stats["tokens_per_round"], 2),
                    }
                ),
                file=sys.stderr,
            )
        return 0
    print_outputs(net, tok, prompts, params, stream, beam_width, length_penalty)
    if guard is not None:
        print(json.dumps({"controls": guard.counts()}), file=sys.stderr)
    return 0
