"""Text prompts for Gemma 3 270M and the greedy continuations (16 tokens, EOS ignored) that
Hugging Face transformers 5.24 computes on the same GGUF file (float32, its own GGUF reader and
dequantizer). The last two prompts are longer than the 512-token sliding window."""

from __future__ import annotations

_WORDS = ("apple", "river", "stone", "cloud", "green", "house", "music", "light", "table", "north")
LONG_LIST = ("Here is a list of numbered words.\n"
             + "".join(f"{i}. {_WORDS[i % 10]}\n" for i in range(1, 160)) + "160.")
LONG_REPEAT = "The quick brown fox jumps over the lazy dog. " * 70 + "The quick brown"
MAX_TOKENS = 16
CONTINUATIONS = {
    "The capital of France is":
        " the capital of the country of France. It is the largest city in France and",
    "def fibonacci(n):": "\n    if n == 0:\n        return 0\n    elif",
    "Once upon a time, there was a":
        " little girl named Lily. She was a very smart girl, and she loved to",
    "The three primary colors are": " red, blue, and yellow.\n\nThe primary colors are red, blue,",
    "Water boils at a temperature of": " 100 degrees Celsius.\n\nThe boiling point of water is 1",
    "1, 2, 3, 4, 5,": " 6, 7, 8, 9, 10,",
    "The largest planet in our solar system is":
        " the largest in our solar system. It is the largest planet in our solar system",
    "Translate to French: Good morning ->":
        " Hello, hello, hello, hello, hello, hello, hello, hello,",
    LONG_LIST: " apple\n161. river\n162. stone\n16",
    LONG_REPEAT: " fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog",
}
PROMPTS = tuple(CONTINUATIONS)
