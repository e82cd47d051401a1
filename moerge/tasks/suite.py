"""The task suite of docs/TASKS.md: 12 held-in tasks (one expert each) and 4 held-out tasks."""

from __future__ import annotations

import datetime as dt
import json
import random

from moerge.tasks import content as C
from moerge.tasks import vocab as V
from moerge.tasks.base import Task


def _date(rng: random.Random) -> dt.date:
    return dt.date(1950, 1, 1) + dt.timedelta(days=rng.randrange(365 * 80))


def _ints(rng, lo, hi, n_lo, n_hi):
    return [rng.randint(lo, hi) for _ in range(rng.randint(n_lo, n_hi))]


def make_add(rng):
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return {"a": a, "b": b}, str(a + b)


def make_mul(rng):
    a, b = rng.randint(2, 99), rng.randint(2, 9)
    return {"a": a, "b": b}, str(a * b)


def make_sub(rng):
    a, b = sorted((rng.randint(0, 999), rng.randint(0, 999)), reverse=True)
    return {"a": a, "b": b}, str(a - b)


def make_list(rng):
    nums = _ints(rng, 0, 99, 4, 6)
    return {"nums": ", ".join(map(str, nums)), "nums_sp": " ".join(map(str, nums))}, nums


def make_sort(rng):
    f, nums = make_list(rng)
    return f, ", ".join(map(str, sorted(nums)))


def make_max(rng):
    f, nums = make_list(rng)
    return f, str(max(nums))


def make_upper(rng):
    s = V.sentence(rng, 3, 8)
    return {"s": s}, s.upper()


def make_lower(rng):
    s = V.sentence(rng, 3, 8).upper()
    return {"s": s}, s.lower()


def make_reverse(rng):
    s = V.sentence(rng, 3, 7)
    if rng.random() < 0.5:
        s = s[0].upper() + s[1:]
    return {"s": s}, " ".join(reversed(s.split()))


def make_count(rng):
    s = V.sentence(rng, 2, 12) if rng.random() < 0.7 else V.random_words(rng, 2, 12)
    return {"s": s}, str(len(s.split()))


def make_iso_to_us(rng):
    d = _date(rng)
    return {"d": d.isoformat()}, d.strftime("%m/%d/%Y")


def make_us_to_iso(rng):
    d = _date(rng)
    return {"d": d.strftime("%m/%d/%Y")}, d.isoformat()


def make_km(rng):
    tenths = rng.randint(1, 999)
    return {"km": f"{tenths // 10}.{tenths % 10}"}, str(tenths * 100)


def make_person(rng):
    name = f"{rng.choice(V.FIRST_NAMES)} {rng.choice(V.LAST_NAMES)}"
    age = rng.randint(18, 90)
    city, job = rng.choice(V.CITIES), rng.choice(V.JOBS)
    forms = [f"{name} is {age} years old and lives in {city}.",
             f"{name}, a {age}-year-old {job}, moved to {city} last year.",
             f"Meet {name}: {age} years old, works as a {job} in {city}.",
             f"At {age}, {name} is the best {job} in {city}.",
             f"{name} ({age}) is a {job} from {city}."]
    return {"s": rng.choice(forms)}, json.dumps({"name": name, "age": age})


def make_review(rng):
    positive = rng.random() < 0.5
    phrase = rng.choice(V.POSITIVE if positive else V.NEGATIVE)
    product = rng.choice(V.PRODUCTS)
    forms = [f"This {product} {phrase}.", f"The {product} {phrase}!", f"I bought the {product} and it {phrase}.",
             f"Honestly, this {product} {phrase}."]
    return {"r": rng.choice(forms)}, "positive" if positive else "negative"


def make_capital(rng):
    country = rng.choice(sorted(V.COUNTRY_CAPITALS))
    return {"c": country}, V.COUNTRY_CAPITALS[country]


def make_n2w(rng):
    n = rng.randint(0, 999) if rng.random() < 0.8 else rng.randint(0, 120)
    return {"n": n}, V.number_to_words(n)


# ---- content pools (tasks/content.py): what experts train on and the `content` shift evaluates on.
# Each maker returns (template fields, answer, content keys); every key is in `pool`.
ADD_DIGITS = {1: 0.15, 2: 0.3, 3: 0.35, 4: 0.2}
MUL_DIGITS = {1: 0.2, 2: 0.5, 3: 0.3}
LIST_DIGITS = {1: 0.3, 2: 0.4, 3: 0.3}


def c_pair(rng, pool, kind, sep):
    a, b = C.draw(rng, pool, kind, lambda r: (C.number(r, ADD_DIGITS), C.number(r, ADD_DIGITS)),
                  key=lambda p: f"{p[0]}{sep}{p[1]}")
    return a, b, (f"{kind}:{a}{sep}{b}",)


def c_add(rng, pool):
    a, b, keys = c_pair(rng, pool, "add", "+")
    return {"a": a, "b": b}, str(a + b), keys


def c_sub(rng, pool):
    a, b, keys = c_pair(rng, pool, "sub", "-")
    a, b = max(a, b), min(a, b)
    return {"a": a, "b": b}, str(a - b), keys


def c_mul(rng, pool):
    a, b = C.draw(rng, pool, "mul", lambda r: (C.number(r, MUL_DIGITS, lo=2), r.randint(2, 9)),
                  key=lambda p: f"{p[0]}*{p[1]}")
    return {"a": a, "b": b}, str(a * b), (f"mul:{a}*{b}",)


def c_list(rng, pool):
    nums = C.draw(rng, pool, "list", lambda r: [C.number(r, LIST_DIGITS) for _ in range(r.randint(3, 7))],
                  key=lambda ns: ",".join(map(str, ns)))
    key = ",".join(map(str, nums))
    return {"nums": ", ".join(map(str, nums)), "nums_sp": " ".join(map(str, nums))}, nums, (f"list:{key}",)


def c_sort(rng, pool):
    f, nums, keys = c_list(rng, pool)
    return f, ", ".join(map(str, sorted(nums))), keys


def c_max(rng, pool):
    f, nums, keys = c_list(rng, pool)
    return f, str(max(nums)), keys


def _text_keys(s):
    return tuple(sorted(f"word:{w}" for w in C.content_words(s)))


def c_upper(rng, pool):
    s = C.text(rng, pool, 2, 10)
    return {"s": s}, s.upper(), _text_keys(s)


def c_lower(rng, pool):
    s = C.text(rng, pool, 2, 10).upper()
    return {"s": s}, s.lower(), _text_keys(s)


def c_reverse(rng, pool):
    s = C.text(rng, pool, 2, 9)
    return {"s": s}, " ".join(reversed(s.split())), _text_keys(s)


def c_count(rng, pool):
    s = C.text(rng, pool, 2, 15)
    return {"s": s}, str(len(s.split())), _text_keys(s)


def c_iso_to_us(rng, pool):
    d = C.date(rng, pool)
    return {"d": d.isoformat()}, d.strftime("%m/%d/%Y"), (f"date:{d.isoformat()}",)


def c_us_to_iso(rng, pool):
    d = C.date(rng, pool)
    return {"d": d.strftime("%m/%d/%Y")}, d.isoformat(), (f"date:{d.isoformat()}",)


def _km(r):
    form = r.random()
    if form < 0.6:
        milli = r.randint(1, 9999) * 100           # one decimal, 0.1-999.9
        return f"{milli // 1000}.{milli % 1000 // 100}", milli
    if form < 0.8:
        milli = r.randint(1, 999) * 1000           # a whole number of km
        return str(milli // 1000), milli
    milli = r.randint(1, 9999) * 10                # two decimals, 0.01-99.99
    return f"{milli // 1000}.{milli % 1000 // 10:02d}", milli


def c_km(rng, pool):
    km, metres = C.draw(rng, pool, "km", _km, key=lambda p: p[0])
    return {"km": km}, str(metres), (f"km:{km}",)


PERSON_FORMS = [
    "{name} is {age} years old and lives in {city}.", "{name}, a {age}-year-old {job}, moved to {city} last year.",
    "Meet {name}: {age} years old, works as a {job} in {city}.", "At {age}, {name} is the best {job} in {city}.",
    "{name} ({age}) is a {job} from {city}.", "Our new {job}, {name}, turned {age} this spring.",
    "In {city}, {name} has worked as a {job} since the age of {age - 10}; today {name} is {age}.",
    "The {job} {name} celebrated turning {age} in {city}.", "{name} lives in {city}, is {age}, and is a {job}.",
    "Age {age}, {job}, based in {city}: that is {name}.",
    "{city} local {name}, {age}, runs a small business as a {job}.",
    "Born {age} years ago, {name} now works as a {job} in {city}."]


def c_person(rng, pool):
    first = C.pick(rng, pool, "first_name", C.FIRST_NAMES)
    last = C.pick(rng, pool, "last_name", C.LAST_NAMES)
    city = C.pick(rng, pool, "city", C.CITIES)
    job = C.pick(rng, pool, "job", C.JOBS)
    age = rng.randint(18, 99)
    name = f"{first} {last}"
    form = rng.choice(PERSON_FORMS).replace("{age - 10}", str(age - 10)).replace("a {job}", "{a_job}")
    s = form.format(name=name, age=age, city=city, job=job, a_job=("an " if job[0] in "aeiou" else "a ") + job)
    return {"s": s}, json.dumps({"name": name, "age": age}), \
        (f"first_name:{first}", f"last_name:{last}", f"city:{city}", f"job:{job}")


REVIEW_FORMS = ["This {p} {x}.", "The {p} {x}!", "I bought the {p} and it {x}.", "Honestly, this {p} {x}.",
                "My {p} {x}.", "Bought a {p} last month. It {x}.", "Five weeks in: the {p} {x}.",
                "Update on the {p}: it {x}.", "Got this {p} as a gift and it {x}."]


def c_review(rng, pool):
    positive = rng.random() < 0.5
    phrase = C.pick(rng, pool, "review_phrase", C.POSITIVE_PHRASES if positive else C.NEGATIVE_PHRASES)
    product = C.pick(rng, pool, "product", C.PRODUCTS)
    r = rng.choice(REVIEW_FORMS).format(p=product, x=phrase)
    return {"r": r}, "positive" if positive else "negative", (f"review_phrase:{phrase}", f"product:{product}")


def c_capital(rng, pool):
    country = C.pick(rng, pool, "country", sorted(C.COUNTRY_CAPITALS))
    return {"c": country}, C.COUNTRY_CAPITALS[country], (f"country:{country}",)


def c_n2w(rng, pool):
    n = C.draw(rng, pool, "n2w", lambda r: C.number(r, {1: 0.1, 2: 0.25, 3: 0.35, 4: 0.3}))
    return {"n": n}, V.number_to_words(n), (f"n2w:{n}",)


DIGITS = " Answer with the number only."
TASKS: list[Task] = [
    Task("arith_add", True, "Adds two whole numbers and answers with their sum as digits only: "
         "addition, plus, total, arithmetic word problems about adding.", make_add,
         ["What is {a} + {b}?" + DIGITS, "Add {a} and {b}.", "Compute the sum of {a} and {b}.",
          "{a} plus {b} equals what?", "Calculate {a} + {b}. Reply with digits only.",
          "What do you get when you add {b} to {a}?", "Sum: {a} + {b} =", "Find the total of {a} and {b}."],
         ["Please work out {a} + {b} and give just the result.", "If I have {a} and add {b}, how many do I have?",
          "Tell me the sum {a}+{b}.", "Addition problem: {a} and {b}. What is the total?",
          "{a} + {b} = ?"], tags=["math", "arithmetic"]),
    Task("arith_mul", True, "Multiplies a number by a single digit and answers with the product as digits "
         "only: multiplication, times, product.", make_mul,
         ["What is {a} * {b}?" + DIGITS, "Multiply {a} by {b}.", "Compute the product of {a} and {b}.",
          "{a} times {b} equals what?", "Calculate {a} x {b}. Reply with digits only.",
          "What do you get when you multiply {a} by {b}?", "Product: {a} * {b} =", "Find {b} times {a}."],
         ["Please work out {a} × {b} and give just the result.", "What is {b} groups of {a}?",
          "Tell me the product {a}*{b}.", "Multiplication problem: {a} and {b}. What is the product?",
          "{a} x {b} = ?"], tags=["math", "arithmetic"]),
    Task("sort_numbers", True, "Sorts a list of integers in ascending order and answers as a "
         "comma-separated list, e.g. 3, 8, 12.", make_sort,
         ["Sort these numbers in ascending order: {nums}", "Arrange from smallest to largest: {nums}",
          "Put these numbers in increasing order: {nums}", "Sort ascending: {nums}",
          "Order the following from low to high: {nums}", "Can you sort {nums} from smallest to biggest?",
          "List these in ascending order: {nums_sp}", "Sort the list [{nums}] in increasing order."],
         ["Please rearrange {nums} so they go from least to greatest.", "Give me {nums_sp} sorted, smallest first.",
          "Numbers: {nums}. Output them in ascending order.", "Order these values ascending: {nums}"],
         tags=["numbers", "sorting", "lists"]),
    Task("uppercase", True, "Rewrites a sentence in upper case (capital letters), keeping every word.", make_upper,
         ["Convert to upper case: {s}", "Write this in capital letters: {s}", "Uppercase this sentence: {s}",
          "Make every letter uppercase: {s}", "Rewrite in all caps: {s}", "Turn this into uppercase: {s}",
          "Change the following text to upper case: {s}", "Capitalize every letter of: {s}"],
         ["Please shout this sentence in capitals: {s}", "Transform \"{s}\" into all capital letters.",
          "ALL CAPS version of: {s}", "Could you put this sentence in uppercase letters? {s}"],
         tags=["text", "case"]),
    Task("reverse_words", True, "Reverses the order of the words in a sentence, keeping each word and its "
         "case unchanged.", make_reverse,
         ["Reverse the order of the words: {s}", "Write these words in reverse order: {s}",
          "Reverse the word order of this sentence: {s}", "Say this sentence backwards, word by word: {s}",
          "Flip the order of the words in: {s}", "Put the words in reverse: {s}",
          "Reverse words: {s}", "Output the words of this sentence from last to first: {s}"],
         ["Please list the words of \"{s}\" starting from the last one.", "Read this sentence back to front by words: {s}",
          "Invert the word sequence: {s}", "Give me the words of this sentence in the opposite order: {s}"],
         tags=["text", "words"]),
    Task("count_words", True, "Counts the words in a sentence and answers with the number as digits only.", make_count,
         ["How many words are in this sentence? {s}", "Count the words: {s}", "Number of words in: {s}",
          "Count how many words this has: {s}", "What is the word count of: {s}",
          "Tell me how many words are in \"{s}\".", "Word count: {s}", "How many words does this text contain? {s}"],
         ["Please count the words in the following sentence: {s}", "I wrote \"{s}\". How many words is that?",
          "Determine the number of words: {s}", "Give the total number of words in this line: {s}"],
         tags=["text", "counting"]),
    Task("date_iso_to_us", True, "Converts a date from ISO format YYYY-MM-DD to US format MM/DD/YYYY.",
         make_iso_to_us,
         ["Convert {d} to MM/DD/YYYY format.", "Write the date {d} in US format.", "Change {d} to US date format.",
          "Reformat the ISO date {d} as month/day/year.", "{d} in American date format is?",
          "Convert this ISO date to US style: {d}", "Express {d} as MM/DD/YYYY.", "US format of {d}:"],
         ["Please rewrite the date {d} the American way (month/day/year).",
          "Turn {d} into a MM/DD/YYYY date.", "What is {d} written in U.S. notation?",
          "Date conversion, ISO to US: {d}"], tags=["dates", "format"]),
    Task("km_to_m", True, "Converts a distance in kilometres to metres and answers with an integer.", make_km,
         ["Convert {km} km to meters.", "How many meters is {km} kilometers?", "{km} km in metres?",
          "Express {km} kilometres in meters.", "Change {km} km into meters." + DIGITS,
          "What is {km} kilometers in meters?", "Convert {km} kilometres to metres.", "{km} km = ? m"],
         ["Please tell me how many metres are in {km} km.", "A road is {km} km long. How long is it in meters?",
          "Distance conversion: {km} kilometers to meters.", "Give {km} km as a number of meters."],
         tags=["units", "conversion", "math"]),
    Task("json_person", True, "Extracts a person's name and age from a sentence and answers with JSON "
         "{\"name\": ..., \"age\": ...}.", make_person,
         ["Extract the name and age as JSON: {s}", "Return JSON with name and age from: {s}",
          "Give a JSON object with the person's name and age. {s}", "Parse into JSON (name, age): {s}",
          "From this sentence, output {{\"name\": ..., \"age\": ...}}: {s}", "JSON of name and age: {s}",
          "Read the text and produce JSON containing name and age. Text: {s}",
          "Pull out the person's name and age in JSON format: {s}"],
         ["Please structure this as JSON with keys name and age: {s}",
          "Make a JSON record (name, age) for the person described here: {s}",
          "Information extraction to JSON, fields name and age. Input: {s}",
          "I need the name and age from \"{s}\" as a JSON object."], json_answer=True,
         tags=["extraction", "json"]),
    Task("sentiment", True, "Classifies the sentiment of a product review as positive or negative.", make_review,
         ["Is this review positive or negative? {r}", "Classify the sentiment: {r}",
          "Sentiment of this review (positive/negative): {r}", "Review: {r} Sentiment:",
          "Does this customer like the product? Answer positive or negative. {r}",
          "Label the review as positive or negative: {r}", "What is the sentiment of: {r}",
          "Positive or negative? {r}"],
         ["Please tell me whether the following product review is positive or negative: {r}",
          "A customer wrote: \"{r}\" Was that a positive or a negative review?",
          "Determine the review's polarity (positive or negative): {r}",
          "Rate the tone of this review as positive or negative. {r}"], case_insensitive=True,
         tags=["classification", "reviews"]),
    Task("capital_of", True, "Names the capital city of a country.", make_capital,
         ["What is the capital of {c}?", "Name the capital city of {c}.", "Capital of {c}:",
          "Which city is the capital of {c}?", "Tell me the capital of {c}.", "{c}'s capital is?",
          "What city is {c}'s capital?", "Give the capital city of {c}."],
         ["Please name the city that serves as the capital of {c}.", "In which city is the government of {c} seated?",
          "Country: {c}. Capital?", "Do you know the capital of {c}? Just the city name."],
         case_insensitive=True, tags=["geography", "facts"]),
    Task("number_to_words", True, "Writes an integer in English words, e.g. 347 -> three hundred forty-seven.",
         make_n2w,
         ["Write {n} in words.", "Spell out the number {n}.", "How do you write {n} in English words?",
          "Convert {n} to words.", "Write the number {n} using words.", "{n} in words is?",
          "Express {n} in English words.", "Spell {n} as words."],
         ["Please write out the number {n} in letters.", "Give me the English name of the number {n}.",
          "Number to text: {n}", "How would you say {n} in words?"], case_insensitive=True,
         tags=["numbers", "text"]),
    # held-out: no expert of their own
    Task("arith_sub", False, "Subtracts two whole numbers.", make_sub, [],
         ["What is {a} - {b}? Answer with the number only.", "Subtract {b} from {a}.",
          "Compute the difference {a} minus {b}.", "If I have {a} and take away {b}, how many remain?",
          "{a} - {b} = ?"], tags=["math"]),
    Task("max_of_list", False, "Finds the largest number in a list.", make_max, [],
         ["What is the largest number in this list: {nums}?", "Find the maximum of {nums}.",
          "Which is the biggest: {nums}?", "Give the highest value among {nums}. Answer with the number only."],
         tags=["numbers"]),
    Task("lowercase", False, "Rewrites a sentence in lower case.", make_lower, [],
         ["Convert to lower case: {s}", "Write this in small letters: {s}", "Lowercase this sentence: {s}",
          "Please rewrite \"{s}\" without any capital letters."], tags=["text"]),
    Task("date_us_to_iso", False, "Converts a US date MM/DD/YYYY to ISO YYYY-MM-DD.", make_us_to_iso, [],
         ["Convert {d} to YYYY-MM-DD format.", "Write the US date {d} in ISO format.",
          "Change {d} to ISO 8601 date format.", "Please rewrite the date {d} as year-month-day (YYYY-MM-DD)."],
         tags=["dates"]),
]


# Each task's content maker, and for held-in tasks the instruction phrases that base.expand_paraphrases
# turns into more training templates (eval templates are never among them).
CONTENT_MAKERS = {
    "arith_add": c_add,
    "arith_mul": c_mul,
    "sort_numbers": c_sort,
    "uppercase": c_upper,
    "reverse_words": c_reverse,
    "count_words": c_count,
    "date_iso_to_us": c_iso_to_us,
    "km_to_m": c_km,
    "json_person": c_person,
    "sentiment": c_review,
    "capital_of": c_capital,
    "number_to_words": c_n2w,
    "arith_sub": c_sub,
    "max_of_list": c_max,
    "lowercase": c_lower,
    "date_us_to_iso": c_us_to_iso,
}
PARAPHRASES = {
    'arith_add': [
        "add {a} and {b}",
        "tell me what {a} plus {b} is",
        "work out the sum of {a} and {b}",
        "give the result of {a} + {b}, digits only",
        "find {a} + {b}",
        "add {b} to {a} and reply with the number",
        "compute {a}+{b}",
        "total up {a} and {b}",
        "solve {a} + {b}",
    ],
    'arith_mul': [
        "multiply {a} by {b}",
        "work out {a} times {b}",
        "give the product of {a} and {b}, digits only",
        "compute {a}*{b}",
        "find {a} × {b}",
        "calculate {b} times {a}",
        "tell me what {a} multiplied by {b} is",
        "solve {a} x {b}",
        "multiply {b} and {a} and reply with the number",
    ],
    'sort_numbers': [
        "sort {nums} in ascending order",
        "arrange {nums} from smallest to largest",
        "put {nums_sp} in increasing order",
        "order these numbers from lowest to highest: {nums}",
        "list {nums} sorted ascending",
        "rearrange these values in ascending order: {nums_sp}",
        "sort the numbers {nums}, smallest first",
        "give me the ascending order of {nums}",
    ],
    'uppercase': [
        "convert this text to upper case: {s}",
        "rewrite this in capital letters: {s}",
        "make the following all caps: {s}",
        "uppercase every letter: {s}",
        "change \"{s}\" to uppercase",
        "write \"{s}\" in capitals",
        "turn the following words into upper case: {s}",
        "put this in all caps: {s}",
        "{s}\n\nConvert the line above to upper case.",
    ],
    'reverse_words': [
        "reverse the order of the words in: {s}",
        "write the words of this text in reverse order: {s}",
        "flip the word order: {s}",
        "list these words from last to first: {s}",
        "put the words of \"{s}\" in reverse order",
        "read this back word by word, starting from the end: {s}",
        "reverse the word sequence of: {s}",
        "{s}\n\nReverse the order of the words above.",
    ],
    'count_words': [
        "count the words in: {s}",
        "tell me how many words this has: {s}",
        "give the number of words in \"{s}\"",
        "count how many words appear here: {s}",
        "find the word count of: {s}",
        "say how many words are in this line, as a number: {s}",
        "work out how many words this text contains: {s}",
        "{s}\n\nHow many words is the text above?",
    ],
    'date_iso_to_us': [
        "convert {d} to MM/DD/YYYY",
        "write {d} as a US date",
        "rewrite the date {d} in month/day/year form",
        "change the ISO date {d} into American format",
        "give {d} in US format (MM/DD/YYYY)",
        "reformat {d} as MM/DD/YYYY",
        "turn the date {d} into US notation",
    ],
    'km_to_m': [
        "convert {km} km to meters",
        "tell me how many metres {km} kilometres is",
        "express {km} km in meters, as a whole number",
        "change {km} kilometers into meters",
        "give {km} km in metres",
        "work out {km} km in meters",
        "convert a distance of {km} km to meters",
    ],
    'json_person': [
        "extract the name and age from this text as JSON: {s}",
        "give me JSON with the person's name and age: {s}",
        "turn this into a JSON object with name and age: {s}",
        "read this and output JSON (name, age): {s}",
        "return {{\"name\": ..., \"age\": ...}} for: {s}",
        "parse the name and age into JSON. Text: {s}",
        "{s}\n\nExtract the name and age above as JSON.",
    ],
    'sentiment': [
        "classify this review as positive or negative: {r}",
        "tell me if this review is positive or negative: {r}",
        "label the sentiment (positive/negative) of: {r}",
        "decide whether this review is positive or negative. {r}",
        "give the sentiment of this product review: {r}",
        "say positive or negative for this review: {r}",
        "{r}\n\nIs the review above positive or negative?",
    ],
    'capital_of': [
        "name the capital of {c}",
        "tell me the capital city of {c}",
        "give the capital of {c}",
        "say which city is the capital of {c}",
        "write the capital city of {c}",
        "answer with the capital of {c}",
        "identify the capital of {c}",
    ],
    'number_to_words': [
        "write {n} in words",
        "spell out {n}",
        "convert the number {n} into English words",
        "give {n} written out in words",
        "write the number {n} in letters",
        "express {n} as English words",
        "turn {n} into words",
    ],
}
for _t in TASKS:
    _t.make_content = CONTENT_MAKERS[_t.name]
    _t.paraphrases = PARAPHRASES.get(_t.name, [])

BY_NAME = {t.name: t for t in TASKS}
HELD_IN = [t.name for t in TASKS if t.held_in]
HELD_OUT = [t.name for t in TASKS if not t.held_in]


def get_task(name: str) -> Task:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; tasks are {sorted(BY_NAME)}") from None


# composed held-out tasks (tasks/composed.py): two held-in skills in sequence; a group of their own, so
# the held-out figures of earlier reports keep their meaning. Imported here, after the makers they reuse.
from moerge.tasks.composed import COMPOSED_STEPS, COMPOSED_TASKS  # noqa: E402

BY_NAME.update({t.name: t for t in COMPOSED_TASKS})
COMPOSED = [t.name for t in COMPOSED_TASKS]
