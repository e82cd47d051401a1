"""Broad content pools, split once into a training pool and an evaluation pool.

The `template` shift draws content from the short lists in `vocab.py`; an expert trained on
those lists can pass it by memorising them. The pools here are what experts train on and what
the `content` shift evaluates on:
- words: the 25 000 most frequent English words of `wordfreq` (a PyPI word list), letters only;
- entities: larger tables of countries, names, cities, jobs, products and review phrases;
- numbers: wider ranges and lengths than the template shift (up to 4 digits, lists of 3–7).

Every content item has a key (a word, an entity, a number pair, a date, a list). A stable hash
of the key puts it in exactly one pool, `train` (80%) or `eval` (20%), so no evaluation item is
ever seen in training, whatever the seed. A few very frequent function words ("the", "of",
"and") glue sentences together in both pools; they are listed in FUNCTION_WORDS and are not
content. `tests/tasks/test_content.py` checks the split for every task.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import random

POOLS = ("train", "eval")
EVAL_SHARE = 5          # one key in five is in the evaluation pool


def pool_of(kind: str, key: str) -> str:
    """The pool ('train' or 'eval') a content item belongs to; fixed by a hash of (kind, key)."""
    h = int.from_bytes(hashlib.sha256(f"{kind}\x00{key}".encode()).digest()[:8], "big")
    return "eval" if h % EVAL_SHARE == 0 else "train"


def _check_pool(pool: str) -> None:
    if pool not in POOLS:
        raise ValueError(f"unknown content pool {pool!r}; pools are {POOLS}")


# ---------------------------------------------------------------------------------------- words

FUNCTION_WORDS = ("the a an of to and in on at for with from by is was are were be it this that "
                  "my your his her our their its as or but not no so very all some one").split()
_EXCLUDED = ("fuck", "shit", "bitch", "cunt", "dick", "pussy", "cock", "whore", "slut", "nigg", "fag", "twat",
             "porn", "sex", "rape", "nazi", "penis", "vagina", "anal", "boob", "tits", "dildo", "horny", "cum")


@functools.lru_cache(maxsize=1)
def _ranked_words() -> tuple[str, ...]:
    from wordfreq import top_n_list
    seen, out = set(FUNCTION_WORDS), []
    for w in top_n_list("en", 30000):
        if w.isascii() and w.isalpha() and len(w) >= 2 and w not in seen and not any(x in w for x in _EXCLUDED):
            seen.add(w)
            out.append(w)
    return tuple(out[:25000])


@functools.lru_cache(maxsize=2)
def words(pool: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(frequent, rare) words of one pool: the frequent ones come from the top 5 000."""
    _check_pool(pool)
    ranked = _ranked_words()
    mine = [(i, w) for i, w in enumerate(ranked) if pool_of("word", w) == pool]
    return tuple(w for i, w in mine if i < 5000), tuple(w for i, w in mine if i >= 5000)


def word(rng: random.Random, pool: str) -> str:
    frequent, rare = words(pool)
    return rng.choice(frequent if rng.random() < 0.6 else rare)


def text(rng: random.Random, pool: str, lo: int, hi: int) -> str:
    """lo..hi words from the pool: a plain word list, or a sentence-like run with function words.
    Casing varies: all lower, a capitalised first word, or a few capitalised words."""
    n = rng.randint(lo, hi)
    if rng.random() < 0.4:
        out = [word(rng, pool) for _ in range(n)]
    else:
        out = []
        for i in range(n):
            glue = i < n - 1 and (not out or out[-1] not in FUNCTION_WORDS) and rng.random() < 0.35
            out.append(rng.choice(FUNCTION_WORDS) if glue else word(rng, pool))
    style = rng.random()
    if style < 0.3:
        out[0] = out[0].capitalize()
    elif style < 0.4:
        out = [w.capitalize() if rng.random() < 0.3 else w for w in out]
    return " ".join(out)


def content_words(s: str) -> set[str]:
    """The content words of a text (what the pools split): lower-cased, without function words."""
    return {w.lower().strip(".,!?\"'") for w in s.split()} - set(FUNCTION_WORDS) - {""}


# -------------------------------------------------------------------------------------- numbers

def number(rng: random.Random, weights: dict[int, float], lo: int = 0) -> int:
    """A number whose digit count is drawn from `weights` ({digits: weight}), then uniform in it."""
    digits = rng.choices(list(weights), list(weights.values()))[0]
    low = max(lo, 0 if digits == 1 else 10 ** (digits - 1))
    return rng.randint(low, 10 ** digits - 1)


def draw(rng: random.Random, pool: str, kind: str, make, key=str, tries: int = 200):
    """Draw items with `make(rng)` until one whose key is in `pool`."""
    _check_pool(pool)
    for _ in range(tries):
        item = make(rng)
        if pool_of(kind, key(item)) == pool:
            return item
    raise RuntimeError(f"no {kind} in the {pool} pool after {tries} draws")


def date(rng: random.Random, pool: str) -> dt.date:
    start = dt.date(1700, 1, 1)
    return draw(rng, pool, "date", lambda r: start + dt.timedelta(days=r.randrange(365 * 500)),
                key=lambda d: d.isoformat())


# ------------------------------------------------------------------------------------- entities

COUNTRY_CAPITALS = {
    "Afghanistan": "Kabul", "Albania": "Tirana", "Algeria": "Algiers", "Andorra": "Andorra la Vella",
    "Angola": "Luanda", "Argentina": "Buenos Aires", "Armenia": "Yerevan", "Australia": "Canberra",
    "Austria": "Vienna", "Azerbaijan": "Baku", "Bahamas": "Nassau", "Bahrain": "Manama", "Bangladesh": "Dhaka",
    "Barbados": "Bridgetown", "Belarus": "Minsk", "Belgium": "Brussels", "Belize": "Belmopan",
    "Benin": "Porto-Novo", "Bhutan": "Thimphu", "Bolivia": "Sucre", "Bosnia and Herzegovina": "Sarajevo",
    "Botswana": "Gaborone", "Brazil": "Brasilia", "Bulgaria": "Sofia", "Burkina Faso": "Ouagadougou",
    "Burundi": "Gitega", "Cambodia": "Phnom Penh", "Cameroon": "Yaounde", "Canada": "Ottawa",
    "Chad": "N'Djamena", "Chile": "Santiago", "China": "Beijing", "Colombia": "Bogota",
    "Costa Rica": "San Jose", "Croatia": "Zagreb", "Cuba": "Havana", "Cyprus": "Nicosia",
    "Czech Republic": "Prague", "Denmark": "Copenhagen", "Djibouti": "Djibouti",
    "Dominican Republic": "Santo Domingo", "Ecuador": "Quito", "Egypt": "Cairo", "El Salvador": "San Salvador",
    "Estonia": "Tallinn", "Ethiopia": "Addis Ababa", "Fiji": "Suva", "Finland": "Helsinki", "France": "Paris",
    "Gabon": "Libreville", "Gambia": "Banjul", "Georgia": "Tbilisi", "Germany": "Berlin", "Ghana": "Accra",
    "Greece": "Athens", "Guatemala": "Guatemala City", "Guinea": "Conakry", "Guyana": "Georgetown",
    "Haiti": "Port-au-Prince", "Honduras": "Tegucigalpa", "Hungary": "Budapest", "Iceland": "Reykjavik",
    "India": "New Delhi", "Indonesia": "Jakarta", "Iran": "Tehran", "Iraq": "Baghdad", "Ireland": "Dublin",
    "Israel": "Jerusalem", "Italy": "Rome", "Jamaica": "Kingston", "Japan": "Tokyo", "Jordan": "Amman",
    "Kazakhstan": "Astana", "Kenya": "Nairobi", "Kuwait": "Kuwait City", "Kyrgyzstan": "Bishkek",
    "Laos": "Vientiane", "Latvia": "Riga", "Lebanon": "Beirut", "Liberia": "Monrovia", "Libya": "Tripoli",
    "Lithuania": "Vilnius", "Luxembourg": "Luxembourg", "Madagascar": "Antananarivo", "Malawi": "Lilongwe",
    "Malaysia": "Kuala Lumpur", "Maldives": "Male", "Mali": "Bamako", "Malta": "Valletta",
    "Mauritania": "Nouakchott", "Mexico": "Mexico City", "Moldova": "Chisinau", "Monaco": "Monaco",
    "Mongolia": "Ulaanbaatar", "Montenegro": "Podgorica", "Morocco": "Rabat", "Mozambique": "Maputo",
    "Myanmar": "Naypyidaw", "Namibia": "Windhoek", "Nepal": "Kathmandu", "Netherlands": "Amsterdam",
    "New Zealand": "Wellington", "Nicaragua": "Managua", "Niger": "Niamey", "Nigeria": "Abuja",
    "North Korea": "Pyongyang", "North Macedonia": "Skopje", "Norway": "Oslo", "Oman": "Muscat",
    "Pakistan": "Islamabad", "Panama": "Panama City", "Paraguay": "Asuncion", "Peru": "Lima",
    "Philippines": "Manila", "Poland": "Warsaw", "Portugal": "Lisbon", "Qatar": "Doha", "Romania": "Bucharest",
    "Russia": "Moscow", "Rwanda": "Kigali", "Saudi Arabia": "Riyadh", "Senegal": "Dakar", "Serbia": "Belgrade",
    "Sierra Leone": "Freetown", "Singapore": "Singapore", "Slovakia": "Bratislava", "Slovenia": "Ljubljana",
    "Somalia": "Mogadishu", "South Africa": "Pretoria", "South Korea": "Seoul", "Spain": "Madrid",
    "Sri Lanka": "Colombo", "Sudan": "Khartoum", "Suriname": "Paramaribo", "Sweden": "Stockholm",
    "Switzerland": "Bern", "Syria": "Damascus", "Taiwan": "Taipei", "Tajikistan": "Dushanbe",
    "Tanzania": "Dodoma", "Thailand": "Bangkok", "Togo": "Lome", "Tunisia": "Tunis", "Turkey": "Ankara",
    "Turkmenistan": "Ashgabat", "Uganda": "Kampala", "Ukraine": "Kyiv", "United Arab Emirates": "Abu Dhabi",
    "United Kingdom": "London", "United States": "Washington", "Uruguay": "Montevideo",
    "Uzbekistan": "Tashkent", "Venezuela": "Caracas", "Vietnam": "Hanoi", "Yemen": "Sanaa",
    "Zambia": "Lusaka", "Zimbabwe": "Harare",
}

FIRST_NAMES = ("Aaliyah Abdul Ada Adrian Aiko Akira Alejandro Alexei Amara Amelia Ana Andrei Anika Arjun Astrid "
               "Aurora Ayesha Bao Beatriz Benjamin Bianca Boris Camila Chen Chiara Chidi Clara Daniel Darius "
               "Dmitri Elena Elif Eliza Emeka Emil Esther Ethan Fatima Felix Fernando Freya Gabriel Giulia Hana "
               "Hassan Helga Ibrahim Ingrid Isaac Isabella Ivan Jakob Javier Jin Joanna Jonas Julia Kai Kamal "
               "Karin Kenji Khalid Kofi Lars Layla Leila Leon Lucas Lucia Mateo Mei Mia Mikhail Ming Nadia "
               "Naomi Nikolai Nora Oliver Oscar Pablo Paolo Pedro Rafael Ravi Sakura Samuel Sara Sofia Stefan "
               "Svetlana Tomas Valentina Victor Yara Yuki Zainab Zara").split()
LAST_NAMES = ("Abara Adeyemi Almeida Andersen Bauer Becker Bianchi Costa Cruz Dahl Diaz Eriksson Fernandez "
              "Fischer Fujita Gomez Gonzalez Haddad Hansen Hernandez Hoffmann Horvat Ivanova Jansen Jensen "
              "Johansson Kaur Kowalski Kumar Lee Lindqvist Martin Mendes Mensah Moreau Murphy Nakamura Nguyen "
              "Nielsen Nowak Oliveira Ortiz Park Patel Pereira Popescu Quinn Ramirez Reyes Richter Romano "
              "Russo Sato Schmidt Schneider Sharma Singh Sokolov Suzuki Tanaka Torres Vargas Walker Wang "
              "Weber Wilson Wright Yamamoto Yilmaz Zhang Zielinski").split()
CITIES = ("Accra Adelaide Almaty Amsterdam Antwerp Athens Atlanta Auckland Baltimore Bangalore Barcelona Bergen "
          "Bilbao Bologna Bordeaux Boston Brisbane Bristol Brno Calgary Cardiff Chicago Cork Curitiba Dallas "
          "Delhi Denver Dresden Dublin Durban Edinburgh Florence Fukuoka Gdansk Geneva Glasgow Gothenburg "
          "Graz Hamburg Hanoi Helsinki Houston Istanbul Jakarta Kyoto Lagos Leeds Leipzig Lille Lima Lisbon "
          "Liverpool Lyon Madrid Malmo Manchester Marseille Melbourne Miami Milan Montreal Mumbai Munich "
          "Nagoya Nairobi Nantes Naples Oslo Osaka Ottawa Oxford Perth Phoenix Porto Prague Quebec Rabat "
          "Riga Rotterdam Salzburg Seattle Seoul Seville Sydney Tallinn Tampere Toronto Toulouse Turin Utrecht "
          "Valencia Vancouver Vienna Vilnius Warsaw Winnipeg Zurich").split()
JOBS = ("accountant actor architect baker barber biologist carpenter cashier chef chemist dancer dentist designer "
        "doctor driver economist editor electrician engineer farmer firefighter gardener geologist historian "
        "journalist judge lawyer librarian mechanic musician nurse painter pharmacist photographer physicist "
        "pilot plumber poet professor programmer sailor scientist singer surgeon tailor teacher translator "
        "veterinarian waiter writer").split()
PRODUCTS = [p.strip() for p in """air fryer, alarm clock, armchair, baby monitor, backpack, bath towel, bike helmet,
    blender, bluetooth speaker, board game, bookshelf, camera bag, camping stove, car seat, ceiling fan, charger,
    coffee grinder, cookbook, cutting board, desk chair, dishwasher, drone, dumbbell set, e-reader,
    electric kettle, espresso machine, fitness tracker, flashlight, frying pan, garden hose, gaming mouse,
    hair dryer, hiking boots, humidifier, ice maker, jigsaw puzzle, juicer, kayak paddle, keyboard, knife set,
    laptop stand, lawn mower, microwave, monitor, mattress, pillow, power bank, pressure cooker, printer,
    raincoat, rice cooker, robot vacuum, rug, scooter, sewing machine, shower head, skateboard, sleeping bag,
    slow cooker, smartwatch, sofa, stand mixer, suitcase, sunglasses, tablet, tent, toaster oven, tripod,
    vacuum cleaner, wall clock, washing machine, water filter, webcam, winter jacket, yoga mat""".split(",")]
POSITIVE_PHRASES = [
    "works like a charm", "is exactly what I needed", "has made my mornings so much easier", "is a joy to use",
    "blew me away", "is brilliant value", "has been flawless for months", "is beautifully designed",
    "does the job perfectly", "makes me happy every time I use it", "is well worth the price",
    "is sturdy and reliable", "outperformed everything else I tried", "has not let me down once",
    "is simply superb", "gets five stars from me", "was a fantastic gift", "is easy to set up and works great",
    "is my new favourite thing", "is top quality", "has been a game changer", "is a delight",
    "feels premium and solid", "is quiet, fast and efficient", "exceeded every expectation I had",
    "is perfect for my family", "is great, I recommend it to everyone", "has held up wonderfully",
    "is incredibly comfortable", "runs smoothly and looks great", "is the best I have owned",
    "was worth every cent", "keeps impressing me", "is a pleasure to use daily", "made a real difference",
    "is excellent in every way", "is fantastic value for money", "performs beautifully",
    "is reliable and well built", "brings me so much joy"]
NEGATIVE_PHRASES = [
    "stopped working after a month", "is a total letdown", "broke the first time I used it",
    "is flimsy and overpriced", "was missing parts", "leaks everywhere", "is far too loud",
    "was a waste of my money", "overheats constantly", "is uncomfortable and cheap", "fell apart in a week",
    "never charged properly", "smells awful", "is much smaller than advertised", "is useless",
    "gave me nothing but trouble", "cracked within days", "is badly made", "arrived broken",
    "is the worst thing I have bought", "disappointed me completely", "does not do what it claims",
    "is poorly designed", "keeps failing", "was returned the next day", "is a nightmare to use",
    "rusted quickly", "is not worth the price", "made me regret buying it", "is painfully slow",
    "has terrible build quality", "ripped on the first day", "stopped responding after a week",
    "is cheaply made junk", "let me down badly", "is awful in every way", "died after two uses",
    "is frustrating and unreliable", "falls short in every way", "wobbles and creaks"]


def pick(rng: random.Random, pool: str, kind: str, items) -> str:
    """An item of `items` that belongs to `pool`."""
    _check_pool(pool)
    mine = _split(kind, tuple(items))[pool]
    return rng.choice(mine)


@functools.lru_cache(maxsize=64)
def _split(kind: str, items: tuple[str, ...]) -> dict[str, list[str]]:
    out = {p: [] for p in POOLS}
    for it in items:
        out[pool_of(kind, it)].append(it)
    for p in POOLS:
        if not out[p]:
            raise ValueError(f"the {p} pool of {kind} is empty")
    return out


def split_of(kind: str, items) -> dict[str, list[str]]:
    return _split(kind, tuple(items))
