"""Regenerate edge.jsonl: inputs at the margins of what tokenizers and models usually see.

Run from anywhere: `python maxact_card/corpus/data/_generate_edge.py`. The output is checked in
and is what the package loads; this script only documents how it was made. It uses no `random`
(whose algorithms have changed between Python versions), only SHA-256 streams, so rerunning it
on any machine reproduces the file byte for byte.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from pathlib import Path

OUT = Path(__file__).with_name("edge.jsonl")


def stream(label: str, n: int) -> bytes:
    """`n` deterministic pseudo-random bytes named by `label`."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{label}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


def pick(label: str, alphabet: str, n: int) -> str:
    return "".join(alphabet[b % len(alphabet)] for b in stream(label, n))


def sqrt_digits(value: int, digits: int) -> str:
    """The first `digits` decimal digits of sqrt(value), computed exactly with integers."""
    root = math.isqrt(value * 10 ** (2 * (digits - 1)))
    return str(root)


NUMBER_FORMS = [
    "0",
    "-0",
    "+1",
    "007",
    "1e10",
    "-2.5E-308",
    "1.7976931348623157e+308",
    "6.02214076e23",
    "0x7fffffff",
    "0b1010_1010",
    "0o755",
    "1_000_000",
    "1,000,000.00",
    "1.000.000,00",
    "½ ¾ ⅞",
    "٠١٢٣٤٥٦٧٨٩",
    "०१२३४५६७८९",
    "一二三四五六七八九十百千万亿",
    "Ⅰ Ⅱ Ⅲ Ⅳ Ⅻ ⅩⅬ",
    "①②③④⑤⑥⑦⑧⑨⑩",
    "３．１４１５９",
    "NaN",
    "inf",
    "-Infinity",
    "3.",
    ".5",
    "99999999999999999999999999999999",
    "18446744073709551615",
    "-9223372036854775808",
    "2024-02-29T23:59:60.999999+14:00",
]


def samples() -> list[str]:
    s: list[str] = []
    # Repetition: one token over and over is where attention sinks and outliers like to show up.
    s.append("the " * 400)
    s.append("a" * 1500)
    s.append("hello world. " * 120)
    s.append("\n".join(["ok"] * 300))
    # Whitespace runs.
    s.append("start" + " " * 1600 + "end")
    s.append("indent:" + "\t" * 600 + "done\n" + "\t\t\tx = 1\n" * 20)
    s.append("line one" + "\n" * 800 + "line two after many newlines")
    s.append(
        "mixed whitespace:\r\n\r\n  \t \u00a0\u00a0 \u2003\u2003 \u3000\u3000 |\u200b|\u200b\u200b|\u2060|\f\v\n"
        + ("\u00a0 \t" * 150)
        + "\u2028line separator\u2029paragraph separator\x85next line\x1c\x1d\x1e"
        + "\r\nend with carriage return\r"
    )
    # Digits.
    s.append(sqrt_digits(2, 1200))
    s.append(" ".join(str(i) for i in range(1, 401)))
    s.append(
        "\n".join(NUMBER_FORMS)
        + "\n"
        + ", ".join(str(int.from_bytes(stream(f"num{i}", 8), "big")) for i in range(40))
    )
    s.append("".join(str(b % 10) for b in stream("phone", 900)))
    # Emoji: single code points, skin tones, ZWJ sequences, flags, keycaps, repeats.
    s.append(
        "😀😃😄😁😆😅🤣😂🙂🙃🫠😉😊😇🥰😍🤩😘 🐶🐱🐭🐹🐰🦊🐻🐼🐨🐯🦁🐮 🍏🍎🍐🍊🍋🍌🍉🍇🍓🫐🍈🍒 "
        "👍👍🏻👍🏼👍🏽👍🏾👍🏿 👨‍👩‍👧‍👦 👩‍💻 🧑🏽‍🚀 🏳️‍🌈 🇯🇵🇧🇷🇳🇬🇩🇪🇮🇳🇲🇽 1️⃣2️⃣3️⃣#️⃣ ❤️‍🔥 🫶🏾"
    )
    s.append("🔥" * 300 + "\n" + "🎉✨" * 150)
    s.append("Great job today!!! 🙌🙌🙌 Can't wait for the weekend 😎🏖️ — see you at 7? 🍕🍻 #friday 🎶")
    # Mixed scripts and unusual unicode.
    s.append(
        "Mixing: English, Русский, Ελληνικά, עברית, العربية, हिन्दी, 中文, 日本語, 한국어, ไทย, "
        "ქართული, Հայերեն, አማርኛ, ᐃᓄᒃᑎᑐᑦ, ᚠᚢᚦᚨᚱᚲ, 𐌲𐌿𐍄𐌹𐍃𐌺, ꦗꦮ, ᠮᠣᠩᠭᠣᠯ, ܣܘܪܝܝܐ, ދިވެހި, "
        "all in one line. Ünïcödé with ñ, ç, ø, å, ß, œ, ł, ğ, ı, ş, đ, ț."
    )
    s.append(
        "Z̷̡̛a̸͓̕l̵̨̛g̴͈͝o̶̡͠ ̷t̸̢̛e̴͔͘x̵̡͝t̷̨̛: c̸o̵m̶b̷i̸n̵i̶n̷g̸ m̵a̶r̷k̸s̵ s̶t̷a̸c̵k̶ "
        + "".join("e" + "\u0301\u0308\u0323\u0330" * 3 for _ in range(60))
    )
    s.append(
        "Bidi: \u202eevil.exe\u202c looks reversed; \u200fRLM\u200e and LRM marks; "
        "עברית with English inside, and العربية 123 456 mixed with digits; "
        "\u2066isolate\u2069 \u2067rtl isolate\u2069 \u2068first strong\u2069."
    )
    s.append(
        "𝐁𝐨𝐥𝐝 𝑰𝒕𝒂𝒍𝒊𝒄 𝓢𝓬𝓻𝓲𝓹𝓽 𝔉𝔯𝔞𝔨𝔱𝔲𝔯 𝕯𝖔𝖚𝖇𝖑𝖊 𝙼𝚘𝚗𝚘 𝖲𝖺𝗇𝗌 ⓒⓘⓡⓒⓛⓔⓓ ＦＵＬＬＷＩＤＴＨ ｈａｌｆ ﾊﾝｶｸ "
        "ℌℑℜℨ ℕℤℚℝℂ ⅈⅉ ™ ℠ № ℃ ℉ Å K µ ﬁ ﬂ ﬀ ﬃ Ǆ ǅ ǆ ʰʲʷ ₀₁₂₃ ⁰¹²³ ᵃᵇᶜ"
    )
    s.append(
        "𓀀𓀁𓀂𓁐𓃰𓆣𓇯 𒀀𒀁𒀂𒁀𒂗 𐀀𐀁𐀂𐀃 𝄞𝄢𝅘𝅥𝅮𝅘𝅥𝅯 🀄🀅🀆 ⠓⠑⠇⠇⠕ ⠺⠕⠗⠇⠙ " + "".join(chr(0x2800 + b) for b in stream("braille", 256))
    )
    s.append(
        "\ue000\ue001\uf8ff private use \U000f0000\U00100000 noncharacters \ufdd0\ufffe\uffff replacement \ufffd\ufffd"
    )
    s.append("shy\u00adhy\u00adphen\u00adat\u00aded wo\u200crd joi\u200dner zero\u200bwidth " * 12)
    # Single characters.
    s.append("a")
    s.append("字")
    s.append("🤖")
    s.append(".")
    # Machine-made strings.
    s.append(
        "\n".join(
            [
                "https://www.example.com/path/to/resource?query=alpha&limit=50&offset=100#section-3",
                "http://127.0.0.1:8080/api/v1/items/42?fields=name,price",
                "https://example.org/wiki/%E6%97%A5%E6%9C%AC%E8%AA%9E_(disambiguation)",
                "ftp://files.example.net/pub/releases/v2.4.1/tool-2.4.1-x86_64.tar.gz",
                "mailto:someone+tag@example.co.uk?subject=Hello%20there",
                "file:///C:/Users/Public/Documents/report%20final%20(2).docx",
                "https://[2001:db8::1]:8443/health",
                "git@github.com:example-org/example-repo.git",
                "s3://bucket-name/prefix/2024/06/03/part-00017.snappy.parquet",
                "data:text/plain;base64,SGVsbG8sIHdvcmxkIQ==",
                "https://user:p%40ss@example.com:444/very/long/" + "/".join(f"seg{i}" for i in range(30)),
                "magnet:?xt=urn:btih:" + stream("magnet", 20).hex(),
            ]
        )
    )
    s.append(base64.b64encode(stream("base64", 1050)).decode())
    s.append(
        "-----BEGIN EXAMPLE KEY-----\n"
        + "\n".join(base64.b64encode(stream(f"pem{i}", 48)).decode() for i in range(14))
        + "\n-----END EXAMPLE KEY-----"
    )
    s.append(
        "\n".join(
            f"{offset:08x}  "
            + " ".join(f"{b:02x}" for b in chunk)
            + "  |"
            + "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
            + "|"
            for offset, chunk in ((i * 16, stream("hexdump", 400)[i * 16 : i * 16 + 16]) for i in range(25))
        )
    )
    s.append(
        "\n".join(
            "{}-{}-4{}-{}{}-{}".format(
                h[0:8], h[8:12], h[13:16], "89ab"[int(h[16], 16) % 4], h[17:20], h[20:32]
            )
            for h in (stream(f"uuid{i}", 16).hex() for i in range(30))
        )
        + "\nsha256 "
        + hashlib.sha256(b"maxact").hexdigest()
    )
    # Special-token look-alikes and template markup appearing as plain text.
    s.append(
        "<s> </s> <unk> <pad> <|endoftext|> <|im_start|>user\nhi<|im_end|> [CLS] [SEP] [MASK] "
        "<bos><eos><|begin_of_text|><|eot_id|><|start_header_id|>assistant<|end_header_id|> "
        "<think></think> <tool_call>{}</tool_call> {{ messages }} {% for m in messages %}{% endfor %} " * 4
    )
    # Terminal output with ANSI escapes and other control characters.
    s.append(
        "\x1b[1;32m✔ passed\x1b[0m  test_parse\n\x1b[1;31m✘ failed\x1b[0m  test_render\n"
        "\x1b[33mwarning:\x1b[0m deprecated flag\nprogress: [#####     ] 50%\r"
        "progress: [##########] 100%\n\x07bell \x08backspace \x1b]0;window title\x07 \x7f delete\n"
        + "".join(f"\x1b[38;5;{i}m█" for i in range(0, 256, 4))
        + "\x1b[0m"
    )
    s.append(
        "Ã©tÃ© cafÃ© naÃ¯ve â€œquotedâ€\x9d â€™apostropheâ€™ ï»¿BOM Ð\x9fÑ€Ð¸Ð²ÐµÑ‚ æ—¥æœ¬èªž "
        "\\u00e9\\u00e8 \\n\\t\\r \\\\ &amp; &lt;tag&gt; &#x1F600; &#233; %20%2F%3F +plus+signs+ "
        "=?UTF-8?B?SGVsbG8=?= \\x41\\x42\\x43"
    )
    s.append("".join(chr(32 + b % 95) for b in stream("ascii", 1200)))
    s.append("(" * 300 + "nested" + ")" * 300 + " [[[[{{{{<<<<" * 20 + ">>>>}}}}]]]]" * 20)
    s.append(
        "Donaudampfschifffahrtselektrizitätenhauptbetriebswerkbauunterbeamtengesellschaft "
        "pneumonoultramicroscopicsilicovolcanoconiosis "
        + "getAbstractSingletonProxyFactoryBeanWithCustomRetryPolicyAndDeferredInitialization" * 3
        + " "
        + "_".join(f"part{i}" for i in range(120))
    )
    s.append(
        "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!?????????????????????????? ...... …… ---- —— –– "
        "=========================================== ******************************** "
        "~~~~~~~~~~~~~~~~~~~~ ########################## //////////////////// \\\\\\\\\\\\\\\\ "
        "________________________________________ |||||||||||||||||||| ;;;;;;;;;;;;;;;; :::::::::::"
    )
    s.append(
        "┌──────────┬──────────┐\n│  ░░▒▒▓▓  │  ◆ ◇ ○ ●  │\n├──────────┼──────────┤\n"
        "│  ▁▂▃▄▅▆▇█ │  ← ↑ → ↓  │\n└──────────┴──────────┘\n"
        + "\n".join("".join("█" if (x * x + y * y) % 7 < 3 else "·" for x in range(40)) for y in range(16))
    )
    s.append(
        "tHiS iS aLtErNaTiNg CaSe. 7h15 15 l337 5p34k. SHOUTING IN ALL CAPS FOR NO REASON. "
        "w h y   a r e   t h e r e   s p a c e s. ᴛɪɴʏ ᴄᴀᴘs. uʍop ǝpısdn. " * 4
    )
    return s


def main() -> None:
    lines = [
        json.dumps({"id": f"edge-{i:03d}", "category": "edge", "text": text}, ensure_ascii=False)
        for i, text in enumerate(samples(), start=1)
    ]
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
