"""
Talk to a GPT-2 fine-tuned on Dolly-15k by model/finetune_dolly.py: one prompt, or an interactive loop.

The instruction (and optional context) is rendered with the training template (prepare_dolly.format_prompt);
the model answers until it emits <|endoftext|>, --max_new_tokens or its block size. Sampling is seeded, so the
same --seed and prompt give the same answer on the same machine.

Run:
    python model/chat.py                                              # logs_finetune/'s model_best.pt, interactive
    python model/chat.py --checkpoint logs_finetune/model_00006.pt    # one checkpoint in particular
    python model/chat.py --prompt "Give me three tips for a job interview." --seed 7
    python model/chat.py --prompt "Who wrote Hamlet?" --context "Hamlet is a tragedy by William Shakespeare."
    python model/chat.py --prompt "Who wrote Hamlet?" --temperature 0           # greedy: the most likely answer
    python model/chat.py --checkpoint logs/model_19072.pt             # build-nanogpt's model, before fine-tuning
    python model/chat.py --checkpoint gpt2                            # OpenAI's GPT-2 (Hub name, or a downloaded dir)
    python model/chat.py --checkpoint exported/                       # a folder model/export_hf.py wrote

Interactive: type an instruction and press Enter; a line `context: TEXT` attaches a context to the next
instruction; `quit`, Ctrl-D or Ctrl-C at the prompt exits; Ctrl-C during an answer stops that answer.
Exit status: 0 done; 1 error (one line says what to do); 2 bad command line.
"""

import argparse
import codecs
import os
import re
import sys
from contextlib import nullcontext, redirect_stdout

import torch

import finetune_dolly as fd
from prepare_dolly import format_prompt, get_tokenizer

DEFAULT_LOG_DIR = "logs_finetune"
HELP_LINE = ("Type an instruction and press Enter. 'context: TEXT' attaches a context to the next instruction; "
             "'quit' or Ctrl-D exits; Ctrl-C stops an answer.")

# -----------------------------------------------------------------------------
# loading the model: every format the trainer can start from, by the rule the export and the evaluation share


def load_model(checkpoint):
    """fd.load_model (a log dir means its model_best.pt, else its newest loadable checkpoint), with a note on
    stderr when the model was never fine-tuned or was fine-tuned from a random init. Returns (model, description)."""
    if checkpoint == DEFAULT_LOG_DIR and not os.path.exists(checkpoint):
        raise fd.UserError(f"no {DEFAULT_LOG_DIR}/ here to take the checkpoint from; fine-tune first with "
                           f"`python model/finetune_dolly.py`, run from the repo root, or pass --checkpoint PATH")
    loaded = fd.load_model(checkpoint)
    if loaded.checkpoint is None:
        print(f"note: {loaded.path} is not fine-tuned on Dolly; expect it to follow the instruction template poorly",
              file=sys.stderr)
    elif loaded.checkpoint.get("init_source") == "random":
        print(f"note: {loaded.path} was fine-tuned from a random init, not a pretrained GPT-2; expect little sense",
              file=sys.stderr)
    return loaded.model, loaded.description


# -----------------------------------------------------------------------------
# one answer


def respond(model, enc, instruction, context="", max_new_tokens=fd.MAX_NEW_TOKENS, temperature=0.8, top_k=50,
            generator=None, autocast=nullcontext(), on_text=None, output_layer=None):
    """Samples the model's response to instruction (+ context), rendered as in training. on_text(str), if given,
    receives the text piece by piece as it is generated. Returns (response text, why it stopped: 'eot',
    'max_new_tokens' or 'block_size'). Raises fd.UserError if the prompt leaves no room in the block.
    output_layer: fd.generation_output_layer(model, autocast), made once for many answers (chat_loop)."""
    prompt = enc.encode_ordinary(format_prompt(instruction, context))
    block_size = model.config.block_size
    if len(prompt) >= block_size:
        raise fd.UserError(f"the prompt is {len(prompt)} tokens but the model reads at most {block_size}; "
                           f"shorten the instruction or the context")
    on_token = None
    if on_text is not None:
        # a token can end inside a multi-byte UTF-8 character (emoji, CJK): hold its bytes until the character is whole
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        started = False

        def on_token(token):
            nonlocal started
            piece = decoder.decode(enc.decode_single_token_bytes(token))
            if not started:  # leading whitespace is dropped, as .strip() does for the returned text
                piece = piece.lstrip()
                started = bool(piece)
            if piece:
                on_text(piece)
    tokens = fd.generate(model, prompt, max_new_tokens, temperature, top_k, generator,
                         autocast=autocast, on_token=on_token, output_layer=output_layer)
    if on_text is not None and started and (tail := decoder.decode(b"", final=True)):
        on_text(tail)  # an answer cut inside a character ends with U+FFFD, as the returned text does
    return enc.decode(tokens).strip(), fd.stop_reason(len(prompt), len(tokens), max_new_tokens, block_size)


def stop_note(stop, max_new_tokens, block_size, text=""):
    if stop == "eot" and not text:
        return "[the model ended its answer at once with <|endoftext|>; try another --seed or a higher --temperature]"
    if stop == "max_new_tokens":
        return f"[cut at --max_new_tokens {max_new_tokens}]"
    if stop == "block_size":
        return f"[cut at the model's context length, {block_size} tokens]"
    return None


# -----------------------------------------------------------------------------
# interactive loop


def chat_loop(model, enc, args, generator, autocast):
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(HELP_LINE)
    context = ""
    output_layer = fd.generation_output_layer(model, autocast)  # its weight copy made once, not per answer
    while True:
        try:
            line = input("\n> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line.lower() in ("quit", "exit"):
            return 0
        if line.lower().startswith("context:"):
            context = line[len("context:"):].strip()
            if context:
                print(f"(context of {len(context)} characters set for the next instruction)")
            else:
                print("(context cleared)")
            continue
        try:
            text, stop = respond(model, enc, line, context, args.max_new_tokens, args.temperature, args.top_k,
                                 generator, autocast, on_text=lambda piece: print(piece, end="", flush=True),
                                 output_layer=output_layer)
            print()
            note = stop_note(stop, args.max_new_tokens, model.config.block_size, text)
            if note:
                print(note)
        except KeyboardInterrupt:
            print("\n[stopped]")
        except fd.UserError as e:
            print(f"error: {e}")
        context = ""  # a context belongs to one instruction


# -----------------------------------------------------------------------------


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Chat with a GPT-2 fine-tuned on Dolly-15k (model/finetune_dolly.py).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_LOG_DIR,
                   help="fine-tune checkpoint (model_NNNNN.pt, model_best.pt) or its log dir (model_best.pt, else "
                        "the newest model_NNNNN.pt), build-nanogpt checkpoint, Hub name (gpt2, ...) or Hugging Face "
                        "folder")
    p.add_argument("--prompt", default=None, help="one instruction: print the response and exit (default: interactive)")
    p.add_argument("--context", default="", help="context for --prompt (the Dolly 'context' field)")
    p.add_argument("--seed", type=int, default=1337,
                   help="sampling seed; the same seed and prompt give the same answer")
    p.add_argument("--max_new_tokens", type=int, default=fd.MAX_NEW_TOKENS, help="most tokens per answer")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    p.add_argument("--top_k", type=int, default=50, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or args.top_k < 0:
        p.error(f"--temperature and --top_k must be >= 0, got {args.temperature}/{args.top_k}")
    if not (args.device in ("auto", "cpu", "mps") or re.fullmatch(r"cuda(:\d+)?", args.device)):
        p.error(f"--device must be auto, cpu, cuda, cuda:N or mps, got {args.device!r}")
    if args.prompt is not None and not args.prompt.strip():
        p.error("--prompt is empty; give an instruction, or leave --prompt out to chat")
    if args.context and args.prompt is None:
        p.error("--context goes with --prompt; in interactive mode type 'context: TEXT' before the instruction")
    return args


def main(argv=None):
    args = get_args(argv)
    return fd.run_tool(lambda: answer(args))


def answer(args):
    device = fd.pick_device(args.device)
    with redirect_stdout(sys.stderr):  # the loaders' notes and warnings stay out of the answer on stdout
        model, source = load_model(args.checkpoint)
        enc = get_tokenizer(verbose=False)
    model.to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"loaded {source}: {n_params / 1e6:.1f}M params, context {model.config.block_size} tokens, "
          f"on {device}", file=sys.stderr)
    _, autocast = fd.pick_autocast(device.split(":")[0])
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if args.prompt is None:
        return chat_loop(model, enc, args, generator, autocast)
    text, stop = respond(model, enc, args.prompt, args.context, args.max_new_tokens, args.temperature, args.top_k,
                         generator, autocast)
    print(text)
    note = stop_note(stop, args.max_new_tokens, model.config.block_size, text)
    if note:
        print(note, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
