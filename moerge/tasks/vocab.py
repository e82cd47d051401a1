"""Word lists and small generators the tasks draw from."""

from __future__ import annotations

import random

from moerge.tasks.content import COUNTRY_CAPITALS as _CAPITALS

SUBJECTS = ["the cat", "my friend", "the teacher", "a small dog", "our neighbor", "the old man", "my sister",
            "the children", "a young girl", "the farmer", "his brother", "the doctor", "every student",
            "the baker", "her mother", "the pilot", "a tall woman", "the king", "my uncle", "the team"]
VERBS = ["likes", "sees", "finds", "carries", "paints", "buys", "cleans", "opens", "reads", "watches",
         "needs", "wants", "moves", "fixes", "brings", "builds", "draws", "sells", "holds", "helps"]
OBJECTS = ["the red ball", "a green apple", "the heavy box", "a new book", "the blue door", "an old map",
           "the wooden chair", "a warm coat", "the big window", "a long letter", "the silver key",
           "a fresh bread", "the broken clock", "a quiet song", "the small boat", "a yellow kite"]
TAILS = ["every day", "in the morning", "at night", "near the river", "after school", "with great care",
         "in the garden", "before dinner", "on sunday", "at the market", "very slowly", "in the rain"]
COMMON_WORDS = ("time year people way day man thing woman life child world school state family student "
                "group country problem hand part place case week company system program question work "
                "number night point home water room mother area money story fact month lot right study "
                "book eye job word business issue side kind head house service friend father power hour "
                "game line end member law car city name team minute idea kid body back parent face level "
                "office door health person art war history party result change morning reason research "
                "girl guy moment air teacher force education foot boy age policy music market sense nation "
                "plan college interest death experience effect class control field development role effort "
                "rate heart drug show leader light voice wife police mind price report decision son view "
                "green blue red quick happy small large bright quiet warm cold fast slow new old good").split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    """A lower-case sentence of lo..hi words: a grammatical core, trimmed or padded."""
    target = rng.randint(lo, hi)
    words = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}".split()
    if rng.random() < 0.6:
        words += rng.choice(TAILS).split()
    while len(words) < target:
        words.append(rng.choice(COMMON_WORDS))
    return " ".join(words[:target])


def random_words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(COMMON_WORDS) for _ in range(rng.randint(lo, hi)))


# the template shift's 74 countries; their capitals come from the broad table of content.py
TEMPLATE_COUNTRIES = (
    "France", "Germany", "Italy", "Spain", "Portugal", "Japan", "China", "India", "Russia", "Canada", "Mexico",
    "Brazil", "Argentina", "Chile", "Peru", "Colombia", "Egypt", "Kenya", "Nigeria", "Ghana", "Ethiopia",
    "Morocco", "South Korea", "Thailand", "Vietnam", "Indonesia", "Philippines", "Australia", "New Zealand",
    "Ireland", "United Kingdom", "Norway", "Sweden", "Finland", "Denmark", "Poland", "Austria", "Switzerland",
    "Belgium", "Netherlands", "Greece", "Turkey", "Iran", "Iraq", "Saudi Arabia", "Israel", "Pakistan",
    "Bangladesh", "Nepal", "Afghanistan", "Cuba", "Jamaica", "Venezuela", "Ukraine", "Hungary",
    "Czech Republic", "Romania", "Bulgaria", "Serbia", "Croatia", "Iceland", "Malaysia", "Singapore", "Uganda",
    "Tanzania", "Zimbabwe", "Senegal", "Tunisia", "Algeria", "Lebanon", "Jordan", "Syria", "Qatar", "Mongolia",
)
COUNTRY_CAPITALS = {c: _CAPITALS[c] for c in TEMPLATE_COUNTRIES}

FIRST_NAMES = ["Alice", "Bob", "Carlos", "Diana", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kate",
               "Liam", "Maria", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera",
               "Wei", "Yusuf", "Zoe", "Anna", "Omar", "Lena", "Marco", "Nina"]
LAST_NAMES = ["Smith", "Garcia", "Chen", "Muller", "Rossi", "Kim", "Novak", "Silva", "Khan", "Brown",
              "Ito", "Dubois", "Larsen", "Okafor", "Petrov", "Lopez"]
CITIES = ["Boston", "Lyon", "Osaka", "Lagos", "Toronto", "Madrid", "Seoul", "Denver", "Porto", "Cairo",
          "Dublin", "Austin", "Krakow", "Perth"]
JOBS = ["nurse", "engineer", "teacher", "chef", "pilot", "painter", "lawyer", "farmer", "writer",
        "dentist", "plumber", "designer"]

PRODUCTS = ["headphones", "blender", "phone case", "backpack", "coffee maker", "desk lamp", "keyboard",
            "running shoes", "water bottle", "tent", "vacuum cleaner", "charger", "jacket", "novel",
            "frying pan", "watch", "mattress", "toaster", "umbrella", "printer"]
POSITIVE = ["works perfectly", "is absolutely fantastic", "exceeded my expectations", "is worth every penny",
            "arrived quickly and works great", "is the best purchase I made this year", "feels sturdy and well made",
            "does exactly what it promises", "is something I love", "is loved by my whole family", "is excellent quality",
            "is something I would buy again", "is comfortable and reliable", "impressed me from day one"]
NEGATIVE = ["broke after two days", "is a complete waste of money", "stopped working within a week",
            "feels cheap and flimsy", "arrived damaged", "is the worst purchase I have made",
            "does not work as described", "is something I regret buying", "is terrible quality", "went straight back to the store",
            "was a huge disappointment", "fell apart quickly", "is noisy and unreliable", "never worked at all"]

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_to_words(n: int) -> str:
    """0..9999 in English words: 347 -> 'three hundred forty-seven', 2005 -> 'two thousand five'."""
    if not 0 <= n <= 9999:
        raise ValueError(n)
    if n >= 1000:
        thousands, rest = divmod(n, 1000)
        return f"{_ONES[thousands]} thousand" + (f" {number_to_words(rest)}" if rest else "")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    return f"{_ONES[hundreds]} hundred" + (f" {number_to_words(rest)}" if rest else "")
