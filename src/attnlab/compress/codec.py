"""A lossy text codec on the autoencoder: text -> tokens -> latents quantised to `bits` per number -> a file.

    attnlab compress encode FILE --model DIR -o FILE.alc [--bits 8]
    attnlab compress decode FILE.alc --model DIR -o FILE.txt

The token stream is cut into chunks of at most max_len tokens, as equal as possible (one model serves every
length, so the last chunk is not padded). Latents are tanh-bounded, so a number is stored as one of 2^bits
levels on [-1, 1] with no per-vector scale; the packed codes are then compressed with LZMA (they are not
uniformly distributed). File layout (little-endian):

    b"ALC1" | u32 header length | header (UTF-8 JSON: format, model fingerprint, bits, latent_dim, chunk
    lengths, characters, payload length) | payload (LZMA of the packed codes) | u32 CRC-32 of all before it

`decode` checks the magic, the CRC, the header, the model's fingerprint and every length before it runs the
model: a corrupted, truncated or foreign file is one clear error (CodecError). decode(encode(text)) gives
exactly the tokens the model reconstructs from the quantised latents (`reconstruct`), which is what the
codec's accuracy measures. It is lossy twice: the tokenizer's own normalisation (MiniLM's WordPiece lowercases
and drops accents and spacing details) and the model's reconstruction errors.
"""
from __future__ import annotations

import json
import lzma
import math
import struct
import zlib

import numpy as np
import torch

from ..types import AttnlabError
from .store import fingerprint

MAGIC = b"ALC1"
FORMAT = "attnlab-codec/1"


class CodecError(AttnlabError):
    """A codec file that is damaged, truncated or made by another model."""


def quantise(latents: torch.Tensor, bits: int) -> torch.Tensor:
    """Latents in [-1, 1] -> integer codes 0 .. 2^bits - 1 (int32)."""
    levels = 2**bits - 1
    return torch.round((latents.float().clamp(-1, 1) + 1) * (levels / 2)).to(torch.int32)


def dequantise(codes: torch.Tensor, bits: int) -> torch.Tensor:
    levels = 2**bits - 1
    return codes.float() * (2 / levels) - 1


def pack(codes: np.ndarray, bits: int) -> bytes:
    """Unsigned codes < 2^bits -> bytes, `bits` bits each (big-endian bit order)."""
    flat = codes.astype(np.uint16).reshape(-1)
    bitplanes = ((flat[:, None] >> np.arange(bits - 1, -1, -1, dtype=np.uint16)) & 1).astype(np.uint8)
    return np.packbits(bitplanes.reshape(-1)).tobytes()


def unpack(buf: bytes, bits: int, count: int) -> np.ndarray:
    need = math.ceil(count * bits / 8)
    if len(buf) != need:
        raise CodecError(f"payload holds {len(buf)} bytes; {count} codes of {bits} bits need {need}")
    planes = np.unpackbits(np.frombuffer(buf, dtype=np.uint8))[: count * bits].reshape(count, bits).astype(np.uint16)
    return (planes << np.arange(bits - 1, -1, -1, dtype=np.uint16)).sum(axis=1).astype(np.int64)


def chunk_lengths(total: int, max_len: int) -> list[int]:
    """`total` tokens in ceil(total / max_len) chunks as equal as possible."""
    if total == 0:
        return []
    k = math.ceil(total / max_len)
    base, extra = divmod(total, k)
    return [base + (i < extra) for i in range(k)]


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def latent_codes(model, ids: list[int], bits: int, device="cpu") -> tuple[list[int], list[torch.Tensor]]:
    """(chunk lengths, per chunk the codes Int[m, latent_dim]) of a token list."""
    lengths = chunk_lengths(len(ids), model.cfg.max_len)
    codes, pos = [], 0
    with torch.no_grad():
        for n in lengths:
            x = torch.tensor([ids[pos: pos + n]], dtype=torch.long, device=device)
            codes.append(quantise(model.encode(x)[0], bits).cpu())
            pos += n
    return lengths, codes


def tokens_from_codes(model, lengths: list[int], codes: list[torch.Tensor], bits: int, device="cpu") -> list[int]:
    out = []
    with torch.no_grad():
        for n, c in zip(lengths, codes):
            lat = dequantise(c.to(device), bits)[None]
            out.extend(model.decode(lat, n)[0].argmax(-1).tolist())
    return out


def reconstruct(model, ids: list[int], bits: int, device="cpu") -> list[int]:
    """The tokens a codec file of these ids decodes to (without writing one)."""
    lengths, codes = latent_codes(model, ids, bits, device)
    return tokens_from_codes(model, lengths, codes, bits, device)


def encode(model, tokenizer, text: str, bits: int = 8, device="cpu") -> bytes:
    if not 1 <= bits <= 16:
        raise AttnlabError(f"--bits must be in 1..16, got {bits}")
    lengths, codes = latent_codes(model, text_ids(tokenizer, text), bits, device)
    return pack_file(model, lengths, codes, bits, len(text))


def pack_file(model, lengths: list[int], codes: list[torch.Tensor], bits: int, characters: int) -> bytes:
    """The codec file of `latent_codes`' output (header, LZMA payload, CRC-32)."""
    flat = np.concatenate([c.numpy().reshape(-1) for c in codes]) if codes else np.zeros(0, np.int64)
    payload = lzma.compress(pack(flat, bits), preset=9 | lzma.PRESET_EXTREME)
    header = json.dumps({"format": FORMAT, "model": fingerprint(model), "bits": bits,
                         "latent_dim": model.cfg.latent_dim, "ratio": model.cfg.ratio, "chunks": lengths,
                         "codes": int(flat.size), "characters": characters, "payload": len(payload)},
                        separators=(",", ":")).encode()
    body = MAGIC + struct.pack("<I", len(header)) + header + payload
    return body + struct.pack("<I", zlib.crc32(body))


def read(buf: bytes) -> tuple[dict, bytes]:
    """(header, packed codes) of a codec file, every check done; nothing run."""
    if buf[:4] != MAGIC:
        raise CodecError("not an attnlab codec file (no ALC1 magic)")
    if len(buf) < 12:
        raise CodecError("the file is truncated")
    body, (crc,) = buf[:-4], struct.unpack("<I", buf[-4:])
    if zlib.crc32(body) != crc:
        raise CodecError("the file is corrupted or truncated (CRC-32 mismatch)")
    (hlen,) = struct.unpack("<I", body[4:8])
    try:
        header = json.loads(body[8: 8 + hlen].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CodecError(f"the file's header is damaged ({e})") from None
    if header.get("format") != FORMAT:
        raise CodecError(f"unknown codec format {header.get('format')!r} (expected {FORMAT!r})")
    payload = body[8 + hlen:]
    if len(payload) != header["payload"]:
        raise CodecError(f"payload is {len(payload)} bytes, the header says {header['payload']}")
    try:
        packed = lzma.decompress(payload)
    except lzma.LZMAError as e:
        raise CodecError(f"the payload does not decompress ({e})") from None
    return header, packed


def decode(model, tokenizer, buf: bytes, device="cpu") -> tuple[str, list[int]]:
    """(text, token ids) of a codec file."""
    header, packed = read(buf)
    if header["model"] != fingerprint(model):
        raise CodecError(f"the file was encoded by another model (fingerprint {header['model']}, this model "
                         f"{fingerprint(model)}); decode it with the --model that encoded it")
    bits, dim, lengths = header["bits"], header["latent_dim"], header["chunks"]
    latent_lens = [model.cfg.latent_len(n) for n in lengths]
    if dim != model.cfg.latent_dim or header["codes"] != sum(latent_lens) * dim:
        raise CodecError(f"the header's shapes ({header['codes']} codes, latent_dim {dim}) do not fit the model")
    flat = torch.from_numpy(unpack(packed, bits, header["codes"]))
    codes, pos = [], 0
    for m in latent_lens:
        codes.append(flat[pos: pos + m * dim].view(m, dim))
        pos += m * dim
    ids = tokens_from_codes(model, lengths, codes, bits, device)
    return tokenizer.decode(ids), ids


def char_accuracy(tokenizer, truth: list[int], pred: list[int]) -> float:
    """Characters held by correctly reconstructed tokens / all characters of the true tokens (token-aligned:
    the decoder returns exactly as many tokens as it was given)."""
    lens = [len(s.removeprefix("##")) for s in tokenizer.convert_ids_to_tokens(truth)]
    total = sum(lens)
    return sum(n for n, t, p in zip(lens, truth, pred) if t == p) / total if total else 1.0


def lossless_baselines(text: str) -> list[dict]:
    import bz2
    import gzip

    if not text:
        raise AttnlabError("the text is empty: no bytes per character to measure")
    raw = text.encode("utf-8")
    rows = []
    for name, fn in (("gzip", lambda b: gzip.compress(b, 9)), ("bz2", lambda b: bz2.compress(b, 9)),
                     ("xz", lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME))):
        rows.append({"codec": name, "bytes": len(fn(raw)), "bytes_per_char": len(fn(raw)) / len(text),
                     "token_accuracy": 1.0, "char_accuracy": 1.0})
    return rows


def report(model, tokenizer, text: str, bits_list=(8, 6, 4), device="cpu") -> list[dict]:
    """One row per bit width: bytes per character of the encoded file, token and character accuracy of what it
    decodes to (against the tokenizer's own tokens of `text`)."""
    ids = text_ids(tokenizer, text)
    if not ids:
        raise AttnlabError(f"the text ({len(text):,} characters) has no tokens for this tokenizer (empty or only "
                           "whitespace): nothing to encode")
    rows = []
    for bits in bits_list:
        lengths, codes = latent_codes(model, ids, bits, device)  # one encoder pass serves the file and its decoding
        size = len(pack_file(model, lengths, codes, bits, len(text)))
        pred = tokens_from_codes(model, lengths, codes, bits, device)
        rows.append({"codec": "attnlab", "bits": bits, "bytes": size, "bytes_per_char": size / len(text),
                     "token_accuracy": sum(a == b for a, b in zip(ids, pred)) / len(ids),
                     "char_accuracy": char_accuracy(tokenizer, ids, pred)})
    return rows
