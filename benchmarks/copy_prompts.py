"""A copy-heavy prompt set for the speculative decoding benchmark, and a few general prompts.

Each copy-heavy prompt is an instruction over a short passage whose answer repeats much of the
passage: verbatim copies, light edits (spelling, one word replaced, a rename in code), reshaping
(a list of steps, bullets) and quotation. This is the shape of much offline work (extraction,
rewriting, summaries that quote, code edits) and where prompt lookup drafts well. The passages
were written for this benchmark. The general prompts ask for new text, where it drafts little.
"""

from __future__ import annotations

LIGHTHOUSE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He carried a small "
    "brass lamp, a notebook and a flask of tea. At the top he wound the clockwork, trimmed the "
    "wick and wrote down the weather: the wind, the clouds and the colour of the sea."
)
NOTICE = (
    "Our office will be closed on Monday for the public holiday. Orders placed over the weekend "
    "will be shipped on Tuesday morning. If you need help before then, please write to the "
    "support team and include your order number, your postcode and a short description of the "
    "problem."
)
RECIPE = (
    "Mix two cups of flour with a teaspoon of salt. Add one cup of warm water and stir until the "
    "dough comes together. Knead it for ten minutes, cover the bowl with a towel and leave it in "
    "a warm place for an hour before baking."
)
NOTES = (
    "Meeting notes, 4 March. Present: Anna, Ben, Chloe and David. Anna reported that the new "
    "website went live on Friday. Ben said that the budget for the spring campaign is still "
    "waiting for approval. Chloe will send the draft contract to the lawyers by Thursday. David "
    "asked everyone to update their holiday plans in the shared calendar."
)
LAMP = (
    "The Model T lamp is made of brushed steel and oak. It stands forty centimetres tall and "
    "uses a standard E27 bulb. The cable is two metres long and has a switch halfway along. The "
    "lamp comes with a five year warranty."
)
CODE = """def count_words(lines):
    count = 0
    for line in lines:
        words = line.split()
        count += len(words)
    return count"""

COPY_PROMPTS: tuple[tuple[str, str], ...] = (
    ("repeat", "Repeat the following passage exactly, word for word:\n\n" + LIGHTHOUSE),
    ("copy", "Copy this notice without changing anything:\n\n" + NOTICE),
    ("steps", "Rewrite the following recipe as a numbered list of steps, keeping the wording:"
              "\n\n" + RECIPE),
    ("spelling", "Fix the spelling mistakes in this text and return the corrected text:\n\n"
                 + NOTICE.replace("shipped", "shiped").replace("weekend", "weekand")
                 .replace("problem", "problam")),
    ("formal", "Rewrite the following text in formal English, changing as little as possible:"
               "\n\n" + LIGHTHOUSE.replace("He carried", "he was carrying")),
    ("replace", "Repeat the following product description, but replace 'steel' with 'copper':"
                "\n\n" + LAMP),
    ("quote", "Quote the sentence from these notes that says who will send the contract:\n\n"
              + NOTES),
    ("code", "In this Python function, rename the variable count to total and return the whole "
             "function:\n\n" + CODE),
)

GENERAL_PROMPTS: tuple[tuple[str, str], ...] = (
    ("sky", "Why is the sky blue? Answer in a short paragraph."),
    ("bakery", "Suggest five names for a small bakery and say why each one works."),
    ("cooking", "Give me three tips for learning to cook."),
    ("planets", "Describe the planets of the solar system in a few sentences."),
)
