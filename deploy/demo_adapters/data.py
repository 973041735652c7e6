"""Deterministic synthetic data for the two demo adapters (sentiment, NER).

Everything comes from the templates and word lists below and a seed: no downloads.
Each list is split into a training part and a held-out part (`split="train" | "heldout"`),
so the held-out sets use templates and fillers the adapters never saw.

sentiment_examples(n, seed, split) -> [(text, label)]          label: 0 negative, 1 positive
ner_examples(n, seed, split)       -> [(text, [(start, end, type)])]  character spans, type PER/ORG/LOC
"""
from __future__ import annotations

import random

SENTIMENT_LABELS = ("negative", "positive")
NER_TYPES = ("PER", "ORG", "LOC")
NER_LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")

# --- sentiment -----------------------------------------------------------------------------------

SUBJECTS = [
    "the movie", "this film", "the food", "the service", "the hotel", "the room", "this phone", "the book",
    "the staff", "the concert", "the app", "the restaurant", "the delivery", "the game", "the laptop",
    "the show", "the acting", "the plot", "our stay", "the customer support", "the coffee", "the pizza",
    "the soundtrack", "the ending", "the camera", "the battery life", "the flight", "the seats", "the price",
    "the album", "this product", "the course", "the teacher", "the waiter", "the update", "the series",
    "the museum", "the trip", "the headphones", "the dessert", "the checkout process", "the new episode",
    "the interface", "the car", "the tour", "the performance", "the screen", "the breakfast", "the beer",
    "the shoes", "the jacket", "the documentary", "the sequel", "the novel", "the play", "the wine",
]
POS_ADJ = [
    "wonderful", "amazing", "excellent", "great", "fantastic", "delightful", "superb", "brilliant", "lovely",
    "outstanding", "perfect", "fun", "enjoyable", "impressive", "charming", "friendly", "fast", "delicious",
    "beautiful", "touching", "helpful", "comfortable", "reliable", "awesome", "incredible", "stunning",
    "hilarious", "spotless", "tasty", "smooth", "gorgeous", "refreshing", "clever", "flawless", "pleasant",
    "terrific", "magnificent", "heartwarming", "fabulous", "marvelous", "exceptional", "satisfying",
    "good", "nice", "solid", "cozy", "generous", "inspiring", "memorable", "exciting",
]
NEG_ADJ = [
    "terrible", "awful", "horrible", "boring", "disappointing", "bad", "poor", "slow", "cold", "rude", "dirty",
    "broken", "bland", "overpriced", "mediocre", "useless", "annoying", "painful", "dull", "noisy",
    "unreliable", "stale", "confusing", "disgusting", "pathetic", "lousy", "tedious", "unbearable", "greasy",
    "flimsy", "buggy", "cramped", "unfriendly", "soggy", "predictable", "forgettable", "miserable", "dreadful",
    "atrocious", "frustrating", "weak", "cheap", "late", "sloppy", "unhelpful", "shallow", "awkward",
    "underwhelming", "worthless", "terribly slow",
]
ADVERBS = ["really", "very", "absolutely", "truly", "incredibly", "so", "quite", "extremely", "pretty",
           "totally", "genuinely", "remarkably", "surprisingly", "just", "honestly"]
POS_VP = [
    "I loved", "I really enjoyed", "I absolutely adored", "we had a great time with", "I would highly recommend",
    "I can't wait to go back to", "we were thrilled with", "I was blown away by", "my kids loved",
    "I am so happy with", "I was impressed by", "I'm really glad I tried", "everyone loved",
    "I would definitely buy", "I will definitely watch", "I was delighted with", "I really like",
    "we thoroughly enjoyed", "I'd give five stars to", "I fell in love with", "I have no complaints about",
    "I'm very satisfied with", "I keep recommending", "I appreciated",
]
NEG_VP = [
    "I hated", "I regret buying", "I was let down by", "I would not recommend", "I want my money back for",
    "I was really disappointed by", "I can't stand", "we walked out of", "I'm never going back to",
    "I wasted my money on", "I was annoyed by", "I gave up on", "nobody enjoyed", "I'm returning",
    "I was frustrated with", "I would avoid", "I really dislike", "I'd give zero stars to",
    "I'm fed up with", "I deeply regret", "I complained about", "I'm so unhappy with", "I was bored by",
    "I was angry about",
]
POS_PHRASES = [
    "Highly recommended!", "Five stars.", "Worth every penny.", "I'll be back.", "Best experience ever.",
    "Would do it again.", "Two thumbs up.", "A total joy.", "Loved every minute.", "Can't recommend it enough.",
    "What a pleasant surprise.", "Exceeded my expectations.", "A must see.", "Great value for money.",
]
NEG_PHRASES = [
    "Never again.", "Avoid at all costs.", "Total waste of money.", "Zero stars.", "What a disaster.",
    "I want a refund.", "Not worth it.", "Very disappointing.", "A complete waste of time.",
    "Do not buy this.", "Worst experience ever.", "I'm still upset.", "Such a letdown.", "Stay away.",
]
# {s}, {s2}: subjects; {a}, {a2}: adjectives of the label; {o}: an adjective of the opposite label;
# {adv}: adverb; {vp}: verb phrase of the label; {p}: closing phrase of the label.
SENT_TEMPLATES = [
    "{S} was {a}.", "{S} was {adv} {a}.", "{S} is {a} and {s2} is {a2}.", "{vp} {s}.", "{vp} {s}!",
    "{vp} {s}, {s2} was {adv} {a}.", "{S} was {a}. {p}", "Honestly, {s} was {a}.", "{vp} it. {p}",
    "{S} was {a}, and {s2} was even more {a2}.", "Wow, {s} was {adv} {a}!", "{S} was not {o} at all, it was {a}.",
    "{S} turned out to be {a}.", "{S} felt {a} from start to finish.", "{p} {S} was {a}.",
    "I thought {s} was {adv} {a}.", "{S}? {A}.", "{vp} {s} and {s2}.", "Overall, {s} was {a}.",
    "{S} was {a} and {a2}.", "{vp} {s}; {s2} was {a}.", "My friends said {s} was {a}, and they were right.",
    # held-out templates (the last 8)
    "{S} was {adv} {a}, and {vp2} {s2}.", "To be honest, {s} seemed {a}.", "Let me just say {s} was {a}. {p}",
    "After a long week, {s} was {adv} {a}.", "{vp} {s} because it was {a}.", "Everything about {s} was {a}.",
    "We found {s} {adv} {a}.", "What a {a} experience, {s} was {adv} {a2}.",
]
SENT_HELDOUT_TEMPLATES = 8
NOT_NEG = "{S} was not {o}."  # "not <positive>" -> negative only (the reverse is ambiguous)


def _split(items: list, split: str, every: int = 5) -> list:
    """Every `every`-th item is held out."""
    keep = [x for i, x in enumerate(items) if (i % every == every - 1) == (split == "heldout")]
    return keep


def sentiment_examples(n: int, seed: int, split: str = "train") -> list[tuple[str, int]]:
    rng = random.Random(seed)
    templates = SENT_TEMPLATES[:-SENT_HELDOUT_TEMPLATES] if split == "train" else SENT_TEMPLATES[-SENT_HELDOUT_TEMPLATES:]
    subjects = _split(SUBJECTS, split)
    adjs = {1: _split(POS_ADJ, split), 0: _split(NEG_ADJ, split)}
    vps = {1: _split(POS_VP, split), 0: _split(NEG_VP, split)}
    phrases = {1: _split(POS_PHRASES, split), 0: _split(NEG_PHRASES, split)}
    out = []
    for i in range(n):
        label = i % 2
        template = NOT_NEG if (label == 0 and rng.random() < 0.06) else rng.choice(templates)
        s, s2 = rng.sample(subjects, 2)
        a, a2 = rng.sample(adjs[label], 2)
        o = rng.choice(adjs[1 - label] if label == 1 else adjs[1])
        fill = dict(s=s, s2=s2, S=s[0].upper() + s[1:], a=a, a2=a2, A=a[0].upper() + a[1:], o=o,
                    adv=rng.choice(ADVERBS), vp=rng.choice(vps[label]), vp2=rng.choice(vps[label]).lower(),
                    p=rng.choice(phrases[label]))
        text = template.format(**fill)
        text = text[0].upper() + text[1:]
        out.append((text, label))
    rng.shuffle(out)
    return out


# --- NER -----------------------------------------------------------------------------------------

FIRST = [
    "John", "Maria", "Wei", "Priya", "Ahmed", "Olga", "Kenji", "Fatima", "Carlos", "Emma", "Liam", "Sofia",
    "Mohammed", "Yuki", "Hannah", "David", "Aisha", "Lucas", "Chloe", "Rahul", "Elena", "James", "Anna",
    "Pedro", "Ingrid", "Omar", "Mei", "Daniel", "Sarah", "Ivan", "Laura", "Kwame", "Julia", "Thomas", "Nadia",
    "Michael", "Grace", "Hiroshi", "Lena", "Robert", "Amara", "Peter", "Chen", "Isabel", "George", "Zara",
    "William", "Fiona", "Diego", "Rachel", "Samuel", "Nina", "Patrick", "Leila", "Victor", "Helen", "Marco",
    "Jessica", "Andrew", "Bianca",
]
LAST = [
    "Smith", "Garcia", "Zhang", "Patel", "Hassan", "Ivanova", "Tanaka", "Okafor", "Mendez", "Johnson",
    "Muller", "Rossi", "Kim", "Nguyen", "Brown", "Schmidt", "Lopez", "Kowalski", "Dubois", "Singh", "Larsen",
    "Silva", "Williams", "Cohen", "Sato", "Novak", "Jensen", "Fischer", "Murphy", "Moreau", "Ali", "Wang",
    "Taylor", "Petrov", "Costa", "Becker", "Anderson", "Yamamoto", "Khan", "Martin", "Walker", "Hoffmann",
    "Edwards", "Romero", "Berg", "Clarke", "Mensah", "Fernandes", "Wright", "Lindqvist", "Baker", "Weber",
    "Russo", "Osei", "Park", "Hughes", "Suzuki", "Carter", "Ortiz", "Keller", "Kuznetsov", "Abernathy",
    "Okonkwo", "Przybylski", "Nakamura", "Gruber", "Achterberg", "Vasquez", "Oyelaran", "Thorvaldsen",
]
FAMOUS = [
    "Barack Obama", "Elon Musk", "Satya Nadella", "Sundar Pichai", "Taylor Swift", "Lionel Messi",
    "Serena Williams", "Emmanuel Macron", "Jeff Bezos", "Bill Gates", "Mark Zuckerberg", "Joe Biden",
    "Oprah Winfrey", "Cristiano Ronaldo", "Rishi Sunak", "Narendra Modi", "Xi Jinping", "Warren Buffett",
    "Greta Thunberg", "Steve Jobs", "Jensen Huang", "Olaf Scholz", "Justin Trudeau", "Shakira",
    "Roger Federer", "Beyonce", "Lady Gaga", "Donald Trump", "Vladimir Putin", "Jacinda Ardern",
]
TITLES = ["Mr.", "Ms.", "Dr.", "President", "Professor", "CEO", "Senator", "Chancellor", "Minister", "Judge",
          "Coach", "Captain", "Mrs."]
ORGS = [
    "Apple", "Google", "Microsoft", "Amazon", "Meta", "IBM", "Intel", "Toyota", "Siemens", "Samsung", "Sony",
    "Nike", "Coca-Cola", "Pepsi", "Walmart", "Netflix", "Tesla", "SpaceX", "Boeing", "Airbus", "Goldman Sachs",
    "JPMorgan", "Deutsche Bank", "United Nations", "NATO", "European Union", "FIFA", "Harvard University",
    "Stanford University", "MIT", "Oxford University", "World Health Organization", "Reuters", "BBC",
    "Volkswagen", "BMW", "Nestle", "Unilever", "Shell", "Exxon Mobil", "Pfizer", "Moderna", "Spotify", "Uber",
    "Airbnb", "OpenAI", "Nvidia", "Oracle", "Adobe", "Salesforce", "Twitter", "Ikea", "Real Madrid",
    "Manchester United", "Ford", "General Motors", "Honda", "Alibaba", "Tencent", "Baidu", "Infosys",
    "Tata Motors", "HSBC", "Barclays", "Visa", "Mastercard", "Disney", "Warner Bros", "Red Cross", "Greenpeace",
    "the World Bank", "Interpol", "Qualcomm", "Cisco", "Dell", "Lufthansa", "Ryanair", "Philips", "Nokia",
    "Ericsson", "Xiaomi", "Huawei", "Bayer", "Novartis", "Roche", "Heineken", "Carrefour", "Danone", "Renault",
    "Peugeot", "Accenture", "Deloitte", "Palantir", "Atlassian", "Shopify", "Stripe", "Klarna", "Zalando",
    "Rakuten", "Siemens Energy", "Bank of America", "University of Tokyo", "Vodafone", "Anthropic",
]
LOCS = [
    "Paris", "London", "Berlin", "Tokyo", "New York", "San Francisco", "Seattle", "Chicago", "Mumbai", "Beijing",
    "Shanghai", "Sydney", "Toronto", "Madrid", "Rome", "Cairo", "Lagos", "Nairobi", "Moscow", "Kyiv", "Warsaw",
    "Vienna", "Zurich", "Geneva", "Dublin", "Amsterdam", "Brussels", "Stockholm", "Oslo", "Helsinki", "Lisbon",
    "Athens", "Istanbul", "Dubai", "Singapore", "Seoul", "Bangkok", "Jakarta", "Manila", "Hanoi", "Mexico City",
    "Sao Paulo", "Buenos Aires", "Lima", "Bogota", "Boston", "Austin", "Denver", "Miami", "Los Angeles", "Texas",
    "California", "Bavaria", "Germany", "France", "Japan", "China", "India", "Brazil", "Canada", "Australia",
    "Italy", "Spain", "Kenya", "Nigeria", "Egypt", "Europe", "Asia", "Africa", "Silicon Valley", "Palo Alto",
    "Redmond", "Mountain View", "Menlo Park", "Munich", "Hamburg", "Osaka", "Bangalore", "Cape Town",
    "Vancouver", "Montreal", "Ohio", "Scotland", "Mexico", "Norway", "Poland", "Turkey", "Argentina",
    "Reykjavik", "Tbilisi", "Yerevan", "Ljubljana", "Bratislava", "Vilnius", "Tallinn", "Almaty", "Kathmandu",
    "Gdansk", "Wroclaw", "Guadalajara", "Monterrey", "Valparaiso", "Brisbane", "Adelaide", "Auckland",
    "Sunnyvale", "Santa Clara", "Kalamazoo", "Ouagadougou", "Timbuktu", "Eindhoven", "Rotterdam", "Marseille",
]
# Pseudo-words (several wordpieces each) teach the tagger to label unseen, split names by context.
SYLLABLES = ["ka", "lo", "mir", "ten", "vor", "sha", "bel", "quin", "dra", "po", "zu", "len", "ash", "ro", "vi",
             "nel", "tor", "gan", "ube", "sel", "cor", "mae", "thi", "rix", "pal", "dun", "oka", "fen"]
LOC_SUFFIXES = ["", "", "ville", "burg", "ton", "ia", "stad", "pur", "abad", "grad", "field", "ino", " City"]
ORG_SUFFIXES = ["", "", " Inc.", " Corp", " Group", " Systems", " Labs", " Bank", " Motors", " Airlines",
                " Foods", " Energy", " University", " Technologies", " Partners", "soft", "tech"]
# {P}: person, {O}: organisation, {L}: location (each may repeat with a digit: {P2}, {L2}).
NER_TEMPLATES = [
    "{P} works for {O} in {L}.", "{P} met {P2} in {L} last week.", "{O} opened a new office in {L}.",
    "{P} is the chief executive of {O}.", "{O} announced that {P} will step down.", "{P} flew from {L} to {L2}.",
    "{O} and {O2} signed a deal in {L}.", "{P} was born in {L}.", "Shares of {O} rose after {P} spoke in {L}.",
    "{P} said {O} would invest in {L}.", "In {L}, {P} visited the offices of {O}.", "{P} joined {O} in 2019.",
    "The meeting between {P} and {P2} took place at {O} in {L}.", "{O} is based in {L}.",
    "{P} moved to {L} to study at {O}.", "{P} and {P2} founded {O}.", "{O} hired {P} as its new director.",
    "According to {O}, the storm hit {L} on Monday.", "{P} thanked {P2} for the support.",
    "{O} sued {O2} over a patent.", "{P} will speak at the {O} conference in {L}.", "{P} lives near {L}.",
    "Protests spread from {L} to {L2}.", "{P} criticized {O} in an interview.", "{O} bought a startup from {L}.",
    "{P} told reporters in {L} that talks with {O} had failed.", "We visited {L} and {L2} in the summer.",
    "{P} scored twice for {O} against {O2}.", "Yesterday {P} had lunch with {P2} in {L}.",
    "{O} plans to build a factory near {L}.", "{P} left {O} to join {O2}.", "The {O} team arrived in {L}.",
    "{P} met with executives from {O} at their headquarters in {L}.", "My friend {P} works at {O}.",
    "{P}, a spokesperson for {O}, declined to comment.", "Talks between {L} and {L2} resumed.",
    "{P} emailed {P2} about the {O} contract.", "Flights from {L} were cancelled, {O} said.",
    "I saw {P} at the airport in {L}.", "{O} reported record profits in {L}.",
    # held-out templates (the last 10)
    "{P} has been appointed head of {O}'s office in {L}.", "Last year {P} sold the company to {O}.",
    "{P} and {P2} spent the weekend in {L}.", "The deal between {O} and {O2} was signed by {P}.",
    "{P} grew up in {L} before moving to {L2}.", "Engineers at {O} in {L} built the prototype.",
    "{P} praised {O} during a visit to {L}.", "Investors in {L} welcomed news from {O}.",
    "{P} interviewed {P2} for a job at {O}.", "A report by {O} says {L} is growing fast.",
]
NER_HELDOUT_TEMPLATES = 10
# Sentences without entities, some with words that are also names (apple, cook, amazon, ...).
PLAIN = [
    "She ate an apple and a banana.", "I like to cook dinner for my family.", "The weather was nice today.",
    "We watched a movie and went to bed.", "He bought a new phone yesterday.", "The meeting starts at noon.",
    "They walked along the river for hours.", "The company will hire more engineers next year.",
    "My sister works at a small bakery.", "The city council approved the new budget.",
    "He read a book about the amazon rainforest.", "The children played in the park.",
    "Our team won the game on Sunday.", "The bank raised interest rates again.", "Can you turn on the lights?",
    "The president of the club gave a short speech.", "I need to buy milk and bread.",
    "The train was late this morning.", "She sent an email to her manager.", "The museum opens at nine.",
    "We hired a new cook for the restaurant.", "The shell was found on the beach.",
    "He drove his car to the office.", "The professor explained the theory.", "Please call me tomorrow.",
]


def _pseudo(rng: random.Random) -> str:
    word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))
    return word[0].upper() + word[1:]


def _person(rng: random.Random, firsts: list, lasts: list, famous: list) -> tuple[str, str]:
    """(prefix outside the entity, person name)."""
    r = rng.random()
    if r < 0.15:
        return "", f"{rng.choice(firsts) if rng.random() < 0.6 else _pseudo(rng)} {_pseudo(rng)}"
    if r < 0.3:
        name = rng.choice(famous)
    elif r < 0.7:
        name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
    elif r < 0.85:
        name = rng.choice(firsts)
    else:
        name = rng.choice(lasts)
    prefix = rng.choice(TITLES) + " " if rng.random() < 0.15 else ""
    return prefix, name


def _case(rng: random.Random, text: str) -> str:
    # The base is uncased; a little lower/upper-casing keeps the data honest about that.
    r = rng.random()
    return text.lower() if r < 0.15 else text


def ner_examples(n: int, seed: int, split: str = "train") -> list[tuple[str, list[tuple[int, int, str]]]]:
    rng = random.Random(seed)
    templates = NER_TEMPLATES[:-NER_HELDOUT_TEMPLATES] if split == "train" else NER_TEMPLATES[-NER_HELDOUT_TEMPLATES:]
    firsts, lasts, famous = _split(FIRST, split), _split(LAST, split), _split(FAMOUS, split)
    orgs, locs = _split(ORGS, split), _split(LOCS, split)
    plain = _split(PLAIN, split)
    out = []
    for _ in range(n):
        if rng.random() < 0.08:
            out.append((_case(rng, rng.choice(plain)), []))
            continue
        template = rng.choice(templates)
        text, spans, pos, used = "", [], 0, {}
        while pos < len(template):
            start = template.find("{", pos)
            if start < 0:
                text += template[pos:]
                break
            end = template.index("}", start)
            text += template[pos:start]
            key = template[start + 1:end]
            kind = key[0]
            if key not in used:
                if kind == "P":
                    prefix, value = _person(rng, firsts, lasts, famous)
                elif rng.random() < 0.2:
                    prefix, value = "", _pseudo(rng) + rng.choice(ORG_SUFFIXES if kind == "O" else LOC_SUFFIXES)
                else:
                    prefix, value = "", rng.choice(orgs if kind == "O" else locs)
                used[key] = (prefix, value)
            prefix, value = used[key]
            if text == "" or text.endswith(". "):
                prefix = prefix[:1].upper() + prefix[1:]
            text += prefix
            if value.startswith("the ") and text == "":
                value = "The " + value[4:]
            ent_start = len(text) + (4 if value.lower().startswith("the ") else 0)
            text += value
            spans.append((ent_start, len(text), {"P": "PER", "O": "ORG", "L": "LOC"}[kind]))
            pos = end + 1
        out.append((_case(rng, text), spans))
    return out


def token_labels(offsets: list[tuple[int, int]], special: list[int], spans) -> list[int]:
    """BIO label ids per token from character spans; -100 for special tokens.

    A token starting an entity gets B-<type>, other tokens inside it I-<type>, the rest O.
    """
    labels = []
    for (s, e), sp in zip(offsets, special):
        if sp:
            labels.append(-100)
            continue
        tag = "O"
        for a, b, kind in spans:
            if a <= s < b:
                tag = ("B-" if s == a else "I-") + kind
                break
        labels.append(NER_LABELS.index(tag))
    return labels


def decode_entities(offsets, label_ids) -> list[tuple[int, int, str]]:
    """Character spans from BIO label ids per token (skips special tokens, whose offsets are (0, 0))."""
    ents, cur = [], None
    for (s, e), lab in zip(offsets, label_ids):
        if s == e:
            continue
        tag = NER_LABELS[lab]
        if tag == "O":
            if cur:
                ents.append(tuple(cur))
            cur = None
            continue
        kind = tag[2:]
        if tag.startswith("B-") or cur is None or cur[2] != kind or s > cur[1] + 1:
            if cur:
                ents.append(tuple(cur))
            cur = [s, e, kind]
        else:
            cur[1] = e
    if cur:
        ents.append(tuple(cur))
    return ents
