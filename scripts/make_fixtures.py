#!/usr/bin/env python3
"""Writes the reference fixtures the Rust tests compare against, from PyTorch + transformers + peft.

    make fixtures        # builds .venv-ref (torch, transformers, peft, gguf) and runs this script

Outputs (committed; the venv is not):
  tests/fixtures/tiny-bert/            a random 2-layer BERT (BertForSequenceClassification layout,
                                       `bert.` prefix, pooler) with a 64-word WordPiece tokenizer
  tests/fixtures/tiny_bert_parity.safetensors
                                       ids, masks, a prompt, and transformers' last hidden states and
                                       pooler outputs with and without the prompt
  tests/fixtures/peft-tiny-adapter/    a SEQ_CLS prompt-tuning adapter written by PEFT itself
  tests/fixtures/peft_tiny_logits.safetensors
                                       PEFT's logits for that adapter on FIXTURE_TEXTS
  tests/fixtures/peft-tiny-p-tuning/   a SEQ_CLS P_TUNING adapter (MLP encoder) written by PEFT
  tests/fixtures/peft_tiny_p_tuning_logits.safetensors
                                       PEFT's logits for it on FIXTURE_TEXTS
  tests/fixtures/peft-tiny-multitask/  a SEQ_CLS MULTITASK_PROMPT_TUNING adapter (3 tasks, rank 2) written by PEFT
  tests/fixtures/peft_tiny_multitask_logits.safetensors
                                       PEFT's logits for it on FIXTURE_TEXTS under each task id [3, 3, 2]
  tests/fixtures/p_tuning_encoders.safetensors
                                       PEFT's PromptEncoder weights (MLP and LSTM) and its outputs
  tests/fixtures/peft-tiny-prefix-{bert,gpt2,llama}/
                                       PREFIX_TUNING adapters written by PEFT (BERT SEQ_CLS through the
                                       projection MLP; GPT-2 and grouped-query Llama CAUSAL_LM)
  tests/fixtures/peft_tiny_prefix_logits.safetensors
                                       PEFT's logits for them (BERT on FIXTURE_TEXTS, the decoders on
                                       padded ids)
  tests/fixtures/tiny-gpt2/            a random 2-layer GPT-2 (GPT2LMHeadModel layout, `transformer.` prefix)
  tests/fixtures/tiny_gpt2_parity.safetensors
                                       ids, mask, a prompt, and transformers' last hidden states (after ln_f)
                                       with and without the prompt
  tests/fixtures/tiny-llama/           a random 2-layer Llama (grouped-query: 4 heads on 2, q/k/v biases)
  tests/fixtures/tiny_llama_parity.safetensors
                                       as for GPT-2 (hidden states after the final RMSNorm)
  tests/fixtures/tiny-t5/, tiny-t5-gated/
                                       random T5s (T5ForConditionalGeneration): ReLU with the tied,
                                       scaled LM head; gated GELU with an untied head and 3 decoder
                                       layers; a T5-style Unigram tokenizer ("</s>" appended)
  tests/fixtures/tiny_t5{,_gated}_parity.safetensors
                                       ids, masks, decoder ids, labels, a prompt, and transformers'
                                       encoder states, decoder logits and loss with and without it
  tests/fixtures/peft-tiny-t5/         a SEQ_2_SEQ_LM prompt-tuning adapter written by PEFT
  tests/fixtures/peft_tiny_t5.safetensors
                                       PEFT's loss for it on T5_PAIRS (one batch) and its greedy tokens
  tests/fixtures/peft-tiny-t5-prefix/, peft_tiny_t5_prefix.safetensors
                                       the same for a SEQ_2_SEQ_LM PREFIX_TUNING adapter
  tests/fixtures/peft-tiny-t5-multitask/, peft_tiny_t5_multitask.safetensors
                                       the same, task by task, for a SEQ_2_SEQ_LM MULTITASK_PROMPT_TUNING
                                       adapter (two submodules: half its prompt before the decoder)
  tests/fixtures/smollm2_logits.safetensors  (when assets/ holds the SmolLM2 GGUF)
                                       transformers' token ids and next-token logits for SMOLLM2_PROMPT,
                                       from the same GGUF (transformers dequantizes and un-permutes it)
  tests/fixtures/minilm_parity.safetensors   (when assets/ holds all-MiniLM-L6-v2)
                                       the real model's token ids and hidden states for a few sentences
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import BertWordPieceTokenizer, Tokenizer
from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
VERSION = "1"

WORDS = (
    "the a an is was it this that movie film story plot actor acting good great fine fun "
    "funny moving wonderful bad awful dull boring weak poor not very too so and but of "
    "to in with for on at by from i you we they he she one two three love hate like"
).split()
FIXTURE_TEXTS = ["a good movie", "the plot was dull and boring", "i love this great film"]


def tiny_bert(dir: Path) -> BertForSequenceClassification:
    dir.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertWordPieceTokenizer(str(dir / "vocab.txt"), lowercase=True).save(str(dir / "tokenizer.json"))
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=24, max_position_embeddings=40, type_vocab_size=2, num_labels=2,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    # Large enough weights that every layer does visible work (the default init is N(0, 0.02)).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0.0, 0.3)
    model.save_pretrained(dir, safe_serialization=True)
    return model


def prompted_inputs(bert: BertModel, ids, types, mask, prompt):
    b, m = ids.shape[0], prompt.shape[0]
    embeds = torch.cat([prompt.unsqueeze(0).expand(b, -1, -1), bert.embeddings.word_embeddings(ids)], 1)
    return dict(
        inputs_embeds=embeds,
        attention_mask=torch.cat([torch.ones(b, m, dtype=mask.dtype), mask], 1),
        token_type_ids=torch.cat([torch.zeros(b, m, dtype=types.dtype), types], 1),
    )


def tiny_parity(model: BertForSequenceClassification) -> None:
    bert = model.bert
    ids = torch.tensor([[2, 5, 20, 9, 25, 3, 0], [2, 30, 31, 3, 40, 41, 3]])
    types = torch.tensor([[0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]])
    torch.manual_seed(1)
    prompt = torch.randn(3, 16)
    with torch.no_grad():
        plain = bert(input_ids=ids, token_type_ids=types, attention_mask=mask)
        prompted = bert(**prompted_inputs(bert, ids, types, mask, prompt))
    save_file(
        {
            "ids": ids.to(torch.int64), "type_ids": types.to(torch.int64), "mask": mask.to(torch.int64),
            "prompt": prompt.contiguous(),
            "hidden_plain": plain.last_hidden_state.contiguous(), "pooled_plain": plain.pooler_output.contiguous(),
            "hidden_prompted": prompted.last_hidden_state.contiguous(),
            "pooled_prompted": prompted.pooler_output.contiguous(),
        },
        FIX / "tiny_bert_parity.safetensors",
        metadata={"version": VERSION},
    )


def peft_adapter(base_dir: Path) -> None:
    from peft import PromptTuningConfig, TaskType, get_peft_model

    model = BertForSequenceClassification.from_pretrained(base_dir).eval()
    peft_model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4))
    torch.manual_seed(2)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.normal_(0.0, 1.0)
        head = peft_model.base_model.classifier.modules_to_save["default"]
        head.weight.normal_(0.0, 0.5)
        head.bias.normal_(0.0, 0.5)
    out = FIX / "peft-tiny-adapter"
    shutil.rmtree(out, ignore_errors=True)
    peft_model.save_pretrained(out)
    peft_model.eval()
    tok = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    logits = []
    with torch.no_grad():
        for text in FIXTURE_TEXTS:
            enc = tok.encode(text)
            assert tok.token_to_id("[UNK]") not in enc.ids, f"{text!r} has words outside the tiny vocabulary"
            ids = torch.tensor([enc.ids])
            logits.append(peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0])
    save_file({"logits": torch.stack(logits).contiguous()}, FIX / "peft_tiny_logits.safetensors",
              metadata={"version": VERSION, "texts": json.dumps(FIXTURE_TEXTS)})


def peft_logits(peft_model, base_dir: Path, **kwargs):
    tok = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    logits = []
    with torch.no_grad():
        for text in FIXTURE_TEXTS:
            ids = torch.tensor([tok.encode(text).ids])
            logits.append(peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits[0])
    return torch.stack(logits).contiguous()


def randomize(module: torch.nn.Module, std: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)


def random_seq_cls_adapter(base_dir: Path, config, seed: int, out: Path):
    """A SEQ_CLS adapter of `config` on the tiny BERT with random weights (its encoder and head),
    saved by PEFT to `out`; returns the PEFT model."""
    from peft import get_peft_model

    model = BertForSequenceClassification.from_pretrained(base_dir).eval()
    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed)
    randomize(peft_model.prompt_encoder["default"], 0.5)
    randomize(peft_model.base_model.classifier.modules_to_save["default"], 0.5)
    shutil.rmtree(out, ignore_errors=True)
    peft_model.save_pretrained(out)
    return peft_model


def multitask(base_dir: Path) -> None:
    """PEFT's MULTITASK_PROMPT_TUNING: the shared prompt and each task's factors as PEFT saves them,
    and PEFT's logits for each task id."""
    from peft import MultitaskPromptTuningConfig, TaskType

    config = MultitaskPromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4, num_tasks=3, num_ranks=2)
    peft_model = random_seq_cls_adapter(base_dir, config, 4, FIX / "peft-tiny-multitask")
    peft_model.eval()
    logits = [peft_logits(peft_model, base_dir, task_ids=torch.tensor([t])) for t in range(3)]
    save_file({"logits": torch.stack(logits).contiguous()}, FIX / "peft_tiny_multitask_logits.safetensors",
              metadata={"version": VERSION, "texts": json.dumps(FIXTURE_TEXTS)})


def p_tuning(base_dir: Path) -> None:
    """PEFT's P_TUNING: an adapter it trains-and-saves (the encoder's output as prompt_embeddings),
    and the PromptEncoder's weights with its output, for the encoder's parity."""
    from peft import PromptEncoder, PromptEncoderConfig, TaskType

    config = PromptEncoderConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4, encoder_hidden_size=8)
    peft_model = random_seq_cls_adapter(base_dir, config, 3, FIX / "peft-tiny-p-tuning")
    peft_model.eval()
    save_file({"logits": peft_logits(peft_model, base_dir)}, FIX / "peft_tiny_p_tuning_logits.safetensors",
              metadata={"version": VERSION, "texts": json.dumps(FIXTURE_TEXTS)})

    tensors = {}
    for kind, hidden in [("MLP", 8), ("LSTM", 5)]:
        config = PromptEncoderConfig(
            task_type=TaskType.SEQ_CLS, num_virtual_tokens=4, token_dim=16, num_transformer_submodules=1,
            num_attention_heads=2, num_layers=2, encoder_reparameterization_type=kind, encoder_hidden_size=hidden,
        )
        encoder = PromptEncoder(config).double()
        randomize(encoder, 0.5)
        with torch.no_grad():
            output = encoder(torch.arange(4).unsqueeze(0))[0]
        name = kind.lower()
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in encoder.state_dict().items()})
        tensors[f"{name}.output"] = output.contiguous()
    save_file(tensors, FIX / "p_tuning_encoders.safetensors", metadata={"version": VERSION})


DECODER_IDS = [[5, 9, 20, 33, 2, 0], [7, 8, 9, 10, 11, 12]]
DECODER_MASK = [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]


def bert_prefix_logits(adapter: Path) -> torch.Tensor:
    from safetensors.torch import load_file
    from transformers import DynamicCache

    model = BertForSequenceClassification.from_pretrained(FIX / "tiny-bert").eval()
    weights = load_file(adapter / "adapter_model.safetensors")
    prefix = weights["prompt_embeddings"]
    cfg = model.config
    p, heads = prefix.shape[0], cfg.num_attention_heads
    kv = prefix.view(p, cfg.num_hidden_layers * 2, heads, cfg.hidden_size // heads).permute(1, 2, 0, 3)
    with torch.no_grad():
        model.classifier.weight.copy_(weights["base_model.classifier.weight"])
        model.classifier.bias.copy_(weights["base_model.classifier.bias"])
    tok = Tokenizer.from_file(str(FIX / "tiny-bert" / "tokenizer.json"))
    logits = []
    with torch.no_grad():
        for text in FIXTURE_TEXTS:
            ids = torch.tensor([tok.encode(text).ids])
            cache = DynamicCache(config=cfg)
            for layer in range(cfg.num_hidden_layers):
                cache.update(kv[2 * layer].unsqueeze(0), kv[2 * layer + 1].unsqueeze(0), layer)
            mask = torch.ones(1, p + ids.shape[1], dtype=torch.long)
            out = model.bert(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
            logits.append(model.classifier(out.pooler_output)[0])
    return torch.stack(logits).contiguous()


def prefix_tuning() -> None:
    """PEFT's PREFIX_TUNING, saved by PEFT: on the tiny BERT (SEQ_CLS, through PEFT's projection MLP,
    so the file holds its output) with PEFT's logits on FIXTURE_TEXTS, and on the tiny GPT-2 and
    Llama (CAUSAL_LM, grouped-query for Llama) with PEFT's logits on padded ids."""
    from peft import PeftModel, PrefixTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    config = PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=3, prefix_projection=True,
                                encoder_hidden_size=8)
    out = FIX / "peft-tiny-prefix-bert"
    random_seq_cls_adapter(FIX / "tiny-bert", config, 11, out)
    # PEFT writes the adapter but refuses to run prefix tuning on BERT under transformers 5 ("Model does
    # not support past key values"), so BERT's logits are transformers' own, given the adapter's prefix
    # as its cache the way PEFT gives a decoder's (keys then values per layer, the mask extended, the
    # positions counted on from the prefix's), with the adapter's pooler-and-classifier head.
    tensors = {"bert.logits": bert_prefix_logits(out)}

    ids, mask = torch.tensor(DECODER_IDS), torch.tensor(DECODER_MASK)
    for name, seed in [("gpt2", 12), ("llama", 13)]:
        base = AutoModelForCausalLM.from_pretrained(FIX / f"tiny-{name}").eval()
        peft_model = get_peft_model(base, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3))
        torch.manual_seed(seed)
        randomize(peft_model.prompt_encoder["default"], 0.5)
        out = FIX / f"peft-tiny-prefix-{name}"
        shutil.rmtree(out, ignore_errors=True)
        peft_model.save_pretrained(out)
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(FIX / f"tiny-{name}"), out).eval()
        with torch.no_grad():
            tensors[f"{name}.logits"] = loaded(input_ids=ids, attention_mask=mask).logits.contiguous()
    tensors.update({"ids": ids, "mask": mask})
    save_file(tensors, FIX / "peft_tiny_prefix_logits.safetensors",
              metadata={"version": VERSION, "texts": json.dumps(FIXTURE_TEXTS)})


def decoder_fixture(name: str, model, base, embed, seed: int) -> None:
    """Saves a tiny random decoder and its last hidden states on padded ids, with and without a prompt."""
    dir = FIX / f"tiny-{name}"
    dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1 and ("ln_" in pname or "norm" in pname):
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0.0, 0.3)
    model.eval().save_pretrained(dir, safe_serialization=True)
    ids, mask = torch.tensor(DECODER_IDS), torch.tensor(DECODER_MASK)
    prompt = torch.randn(3, model.config.hidden_size)
    b = ids.shape[0]
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask).last_hidden_state
        embeds = torch.cat([prompt.unsqueeze(0).expand(b, -1, -1), embed(ids)], 1)
        full_mask = torch.cat([torch.ones(b, 3, dtype=mask.dtype), mask], 1)
        prompted = base(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state
    save_file(
        {"ids": ids, "mask": mask, "prompt": prompt.contiguous(), "hidden_plain": plain.contiguous(),
         "hidden_prompted": prompted.contiguous()},
        FIX / f"tiny_{name}_parity.safetensors",
        metadata={"version": VERSION},
    )


def tiny_decoders() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    decoder_fixture("gpt2", gpt2, gpt2.transformer, gpt2.transformer.wte, 5)
    torch.manual_seed(6)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                         rope_theta=10000.0, attention_bias=True, tie_word_embeddings=True))
    decoder_fixture("llama", llama, llama.model, llama.model.embed_tokens, 7)


T5_PAIRS = [("a good movie", "great"), ("the plot was dull and boring", "bad film"), ("i love this", "good")]


def t5_tokenizer() -> Tokenizer:
    """A T5-style tokenizer over WORDS: Unigram pieces after a Metaspace split, "</s>" appended
    to every encoding (no BOS), ids 0/1/2 for <pad>, </s>, <unk> as in T5's spiece model."""
    from tokenizers import models, pre_tokenizers, decoders, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken("<pad>", special=True), AddedToken("</s>", special=True),
                            AddedToken("<unk>", special=True)])
    return tok


def t5_batch(tok: Tokenizer, pairs):
    """Right-padded input ids and mask, labels (EOS after each target, -100 padding) and the
    decoder's input (transformers' shift right from the start token 0)."""
    inputs = [tok.encode(x).ids for x, _ in pairs]
    targets = [tok.encode(y).ids for _, y in pairs]
    for ids in inputs + targets:
        assert 2 not in ids, "a fixture text has words outside the tiny vocabulary"
    n, t = max(map(len, inputs)), max(map(len, targets))
    ids = torch.tensor([x + [0] * (n - len(x)) for x in inputs])
    mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in inputs])
    labels = torch.tensor([y + [-100] * (t - len(y)) for y in targets])
    decoder_ids = torch.cat([torch.zeros(len(pairs), 1, dtype=torch.long), labels[:, :-1].clamp(min=0)], 1)
    return ids, mask, labels, decoder_ids


def tiny_t5(name: str, seed: int, untied_head: bool = False, **config) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    dir = FIX / name
    shutil.rmtree(dir, ignore_errors=True)
    dir.mkdir(parents=True)
    tok = t5_tokenizer()
    tok.save(str(dir / "tokenizer.json"))
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=tok.get_vocab_size(), d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=3,
                   relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **config)
    model = T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "layer_norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
            elif "relative_attention_bias" in pname:
                p.normal_(0.0, 1.0)
            elif pname in ("shared.weight", "lm_head.weight"):
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 0.4)
    model.save_pretrained(dir, safe_serialization=True)
    if untied_head:
        # transformers 5 ties every new T5's head to `shared`; a v1.1 checkpoint has its own
        # `lm_head.weight`, which from_pretrained then keeps apart
        from safetensors.torch import load_file
        weights = load_file(dir / "model.safetensors")
        weights["lm_head.weight"] = torch.randn(cfg.vocab_size, cfg.d_model)
        save_file(weights, dir / "model.safetensors", metadata={"format": "pt"})
        model = T5ForConditionalGeneration.from_pretrained(dir).eval()
        assert not torch.equal(model.lm_head.weight, model.shared.weight), "the head stayed tied"
    ids, mask, labels, decoder_ids = t5_batch(tok, T5_PAIRS)
    torch.manual_seed(seed + 1)
    prompt = torch.randn(3, 16)
    b = ids.shape[0]
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, labels=labels)
        embeds = torch.cat([prompt.unsqueeze(0).expand(b, -1, -1), model.shared(ids)], 1)
        full_mask = torch.cat([torch.ones(b, 3, dtype=mask.dtype), mask], 1)
        prompted = model(inputs_embeds=embeds, attention_mask=full_mask, decoder_input_ids=decoder_ids, labels=labels)
    save_file(
        {"ids": ids, "mask": mask, "labels": labels, "decoder_ids": decoder_ids, "prompt": prompt.contiguous(),
         "encoder_plain": plain.encoder_last_hidden_state.contiguous(), "logits_plain": plain.logits.contiguous(),
         "loss_plain": plain.loss.reshape(1), "encoder_prompted": prompted.encoder_last_hidden_state.contiguous(),
         "logits_prompted": prompted.logits.contiguous(), "loss_prompted": prompted.loss.reshape(1)},
        FIX / f"{name.replace('-', '_')}_parity.safetensors",
        metadata={"version": VERSION},
    )


def decoder_logits(peft_model, ids, mask, decoder_ids, task: int = None):
    """PEFT's logits at every decoder position for decoder_ids. A multitask model takes the
    decoder's input as embeddings (its forward puts its prompt's second half in front of them and
    cannot take ids), and its logits then cover those prompt rows too: the last len(decoder_ids)
    are the ids'."""
    if task is None:
        return peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    b, t = decoder_ids.shape
    logits = peft_model(input_ids=ids, attention_mask=mask, decoder_inputs_embeds=peft_model.word_embeddings(decoder_ids),
                        task_ids=torch.full((b,), task)).logits
    return logits[:, -t:]


def greedy(peft_model, enc, new_tokens: int, task: int = None) -> list:
    """Greedy decoding by whole forward passes, the decoder start token first, up to EOS (1).
    Not PEFT's `generate`: under transformers 5.25 it drops a SEQ_2_SEQ_LM prefix (generate's own
    `cache` wins over the `past_key_values` PEFT passes, and the base model's tokens come out),
    and for a multitask prompt it leaves out the decoder's half that PEFT's forward trains with;
    PEFT's forward reads both."""
    tokens = [0]
    while len(tokens) <= new_tokens and tokens[-1] != 1:
        logits = decoder_logits(peft_model, enc, torch.ones_like(enc), torch.tensor([tokens]), task)
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


def peft_t5(config, name: str, seed: int, std: float, tasks: int = 0) -> None:
    """A SEQ_2_SEQ_LM adapter of `config` written by PEFT on the tiny T5 (peft-tiny-{name}/), PEFT's
    loss for it on T5_PAIRS in one batch (the mean over every label token), its greedy tokens for
    each input and its logits at the decoder's first position (what rank classification scores
    label words by), in peft_tiny_{name}.safetensors; for a multitask adapter of `tasks` tasks,
    each task's as loss_{t}, generated_{t} and first_logits_{t}."""
    from peft import get_peft_model
    from transformers import T5ForConditionalGeneration

    base = FIX / "tiny-t5"
    model = T5ForConditionalGeneration.from_pretrained(base).eval()
    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed)
    randomize(peft_model.prompt_encoder["default"], std)
    out = FIX / f"peft-tiny-{name}"
    shutil.rmtree(out, ignore_errors=True)
    peft_model.save_pretrained(out)
    peft_model.eval()
    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    ids, mask, labels, _ = t5_batch(tok, T5_PAIRS)
    tensors = {}
    for task in range(tasks) if tasks else [None]:
        suffix = "" if task is None else f"_{task}"
        task_ids = {} if task is None else {"task_ids": torch.full((ids.shape[0],), task)}
        with torch.no_grad():
            loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels, **task_ids).loss
            start = torch.zeros(ids.shape[0], 1, dtype=torch.long)
            first = decoder_logits(peft_model, ids, mask, start, task)[:, 0]
            generated = []
            for x, _ in T5_PAIRS:
                enc = torch.tensor([tok.encode(x).ids])
                tokens = greedy(peft_model, enc, 6, task)
                generated.append(tokens + [-1] * (7 - len(tokens)))
        tensors |= {f"loss{suffix}": loss.reshape(1), f"generated{suffix}": torch.tensor(generated),
                    f"first_logits{suffix}": first.contiguous()}
    save_file(tensors, FIX / f"peft_tiny_{name.replace('-', '_')}.safetensors",
              metadata={"version": VERSION, "pairs": json.dumps(T5_PAIRS)})


def t5_fixtures() -> None:
    tiny_t5("tiny-t5", 11)
    tiny_t5("tiny-t5-gated", 12, untied_head=True, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
            num_decoder_layers=3)
    from peft import PromptTuningConfig, TaskType

    peft_t5(PromptTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=4), "t5", 9, 1.0)
    peft_t5_prefix()
    peft_t5_multitask()


def peft_t5_prefix() -> None:
    from peft import PrefixTuningConfig, TaskType

    # PEFT sizes a prefix by d_model (16), which the tiny T5's 3 heads of d_kv 4 do not divide: its
    # keys and values are 12 wide, so the config says so
    peft_t5(PrefixTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=3, token_dim=12,
                               num_attention_heads=3), "t5-prefix", 10, 0.5)


def peft_t5_multitask() -> None:
    from peft import MultitaskPromptTuningConfig, TaskType

    # two submodules, PEFT's SEQ_2_SEQ_LM default: a [6, 16] prompt, rows 3.. before the decoder
    peft_t5(MultitaskPromptTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=3, num_tasks=2,
                                        num_ranks=2), "t5-multitask", 13, 1.0, tasks=2)


SMOLLM2_PROMPT = "The capital of France is"


def smollm2_logits() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models, name = ROOT / "assets" / "models", "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (models / name).is_file():
        print("skipping SmolLM2 fixtures: run `make assets` first", file=sys.stderr)
        return
    tok = AutoTokenizer.from_pretrained(models, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(models, gguf_file=name, dtype=torch.float32).eval()
    ids = tok(SMOLLM2_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    save_file({"ids": ids[0].contiguous(), "logits": logits.contiguous()}, FIX / "smollm2_logits.safetensors",
              metadata={"version": VERSION, "prompt": SMOLLM2_PROMPT})


MINILM_SENTENCES = [
    "A gorgeous, witty, seductive movie.",
    "The plot is nothing but boilerplate clichés from start to finish.",
    "It's a bit long.",
]


def minilm_parity() -> None:
    model_dir = ROOT / "assets" / "models" / "all-MiniLM-L6-v2"
    if not model_dir.is_dir():
        print("skipping MiniLM fixtures: run `make assets` first", file=sys.stderr)
        return
    tok = BertTokenizerFast.from_pretrained(model_dir)
    bert = BertModel.from_pretrained(model_dir).eval()
    enc = tok(MINILM_SENTENCES, padding=True, return_tensors="pt")
    torch.manual_seed(3)
    prompt = torch.rand(5, 384) - 0.5
    with torch.no_grad():
        plain = bert(**enc).last_hidden_state
        prompted = bert(**prompted_inputs(bert, enc["input_ids"], enc["token_type_ids"], enc["attention_mask"], prompt))
    save_file(
        {
            "ids": enc["input_ids"].to(torch.int64), "mask": enc["attention_mask"].to(torch.int64),
            "prompt": prompt.contiguous(), "hidden_plain": plain.contiguous(),
            "hidden_prompted": prompted.last_hidden_state.contiguous(),
        },
        FIX / "minilm_parity.safetensors",
        metadata={"version": VERSION, "sentences": json.dumps(MINILM_SENTENCES)},
    )


PARTS = {
    "tiny-bert": lambda: tiny_parity(tiny_bert(FIX / "tiny-bert")),
    "peft": lambda: peft_adapter(FIX / "tiny-bert"),
    "p-tuning": lambda: p_tuning(FIX / "tiny-bert"),
    "multitask": lambda: multitask(FIX / "tiny-bert"),
    "decoders": lambda: tiny_decoders(),
    "prefix": lambda: prefix_tuning(),
    "t5": lambda: t5_fixtures(),
    "t5-prefix": lambda: peft_t5_prefix(),
    "t5-multitask": lambda: peft_t5_multitask(),
    "smollm2": lambda: smollm2_logits(),
    "minilm": lambda: minilm_parity(),
}

if __name__ == "__main__":
    # `make_fixtures.py p-tuning` writes that part alone (the others stay as committed); no
    # argument writes them all
    parts = sys.argv[1:] or list(PARTS)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        sys.exit(f"unknown fixture parts {unknown}; expected some of {list(PARTS)}")
    torch.set_num_threads(1)
    FIX.mkdir(parents=True, exist_ok=True)
    for part in parts:
        PARTS[part]()
    print("fixtures written to", FIX)
