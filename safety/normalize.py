"""Text as the rules see it: one canonical spelling for the many ways to
write the same word.

`fold(text)` is what blocked terms and patterns are matched against:
NFKC (fullwidth and styled letters), format characters removed (zero-width
spaces and joiners, soft hyphens, bidi controls), case folded, Cyrillic and
Greek letters that look like Latin ones mapped to them, accents dropped,
and letters spaced out with separators ("k i l l", "k.i.l.l") joined.
`leet_spellings` also read digits and symbols as the letters they stand for
("k1ll" → "kill"); it is a second variant, because applied to ordinary
text ("5 apples") it would make false matches of its own. `squash` leaves
letters and digits only, for the few attack phrases matched run together.

`decoded_payloads(text)` finds base64 runs that decode to readable text: an
instruction hidden that way is checked as the text it decodes to.

No library does the folding: the Unicode confusables table maps to a
"skeleton" that is not text (and differs from what a reader sees), and the
transliterators map Cyrillic "р" to "r" by sound where a reader sees "p".
The table below is the letters of confusables.txt that look like a Latin
letter in common fonts.
"""
from __future__ import annotations

import base64
import binascii
import re
import unicodedata

_CONFUSABLES = str.maketrans({
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p",
    "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "һ": "h",
    "ԁ": "d", "ԛ": "q", "ԝ": "w", "ӏ": "l", "ɡ": "g",
    # Greek
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
    "τ": "t", "υ": "u", "χ": "x", "ω": "w", "γ": "y", "μ": "u",
    # Latin look-alikes outside ASCII that NFKC keeps
    "ı": "i", "ł": "l", "ø": "o", "đ": "d", "ħ": "h", "ŧ": "t",
})

_LEET = {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g",
         "@": "a", "$": "s", "!": "i", "|": "l", "+": "t", "€": "e"}
# "1" and "|" stand for "i" as often as for "l" ("k1ll", "ki11"): both readings.
_LEET_I = str.maketrans({**_LEET, "|": "i"})
_LEET_L = str.maketrans({**_LEET, "1": "l"})

# Three or more single letters or digits, each followed by separators:
# "k i l l", "k.i.l.l", "k-i-l-l", "k_i_l_l" (not "a b" or ordinary words).
_SPACED = re.compile(r"(?<![^\W_])(?:[^\W_][\W_]{1,3}){2,}[^\W_](?![^\W_])")
_SEPARATORS = re.compile(r"[\W_]+")
_BASE64 = re.compile(r"[A-Za-z0-9+/]{16,}={0,2}")
MAX_PAYLOADS = 8


def _drop_format_chars(text: str) -> str:
    # Category Cf: zero-width space/joiners, soft hyphen, bidi controls, BOM.
    return "".join(ch for ch in text if unicodedata.category(ch) != "Cf")


def _drop_accents(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return unicodedata.normalize("NFC", "".join(ch for ch in decomposed if not unicodedata.combining(ch)))


def _join_spaced(text: str) -> str:
    return _SPACED.sub(lambda m: _SEPARATORS.sub("", m.group(0)), text)


def fold(text: str) -> str:
    """The canonical spelling rules match against (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text)
    text = _drop_format_chars(text).casefold().translate(_CONFUSABLES)
    return _join_spaced(_drop_accents(text))


def leet_spellings(folded: str) -> list[str]:
    """`fold`'s output with digits and symbols read as letters (two readings)."""
    return [_join_spaced(folded.translate(_LEET_I)), _join_spaced(folded.translate(_LEET_L))]


def squash(folded: str) -> str:
    """Letters and digits only: "i g n o r e a l l" spaced with single spaces
    between words too leaves no word boundary to find, so a few well-known
    attack phrases are also matched run together (safety.rules)."""
    return _SEPARATORS.sub("", folded)


def decoded_payloads(text: str) -> list[str]:
    """Readable text hidden in base64 runs (at most MAX_PAYLOADS of them)."""
    found = []
    for match in _BASE64.finditer(text):
        chunk = match.group(0)
        try:
            decoded = base64.b64decode(chunk + "=" * (-len(chunk) % 4), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
        printable = sum(ch.isprintable() or ch.isspace() for ch in decoded)
        if decoded and printable / len(decoded) > 0.95 and " " in decoded:
            found.append(decoded)
            if len(found) >= MAX_PAYLOADS:
                break
    return found
