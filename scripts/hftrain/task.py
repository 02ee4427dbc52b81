"""The embedded default task: short product reviews whose star rating follows from their words.

Each review names a product and describes two to four aspects with adjectives of known
sentiment (-2 .. +2). The rating is the rounded mean sentiment shifted to 1..5, so a model
has to read every adjective and average them; no single word gives the answer away.
Ratings are balanced, so an untrained model scores 20% (chance).
"""

import math
import random

RATINGS = ("1", "2", "3", "4", "5")
ANSWER_PREFIX = " Rating:"  # every example ends with "Rating: <digit>"

ADJECTIVES = {
    -2: ["awful", "broken", "useless", "terrible", "dreadful", "horrible", "defective", "worthless"],
    -1: ["flimsy", "noisy", "slow", "dull", "clumsy", "mediocre", "cheap", "fragile"],
    0: ["okay", "average", "plain", "ordinary", "standard", "typical", "acceptable", "passable"],
    1: ["good", "solid", "handy", "reliable", "pleasant", "decent", "sturdy", "nice"],
    2: ["superb", "flawless", "outstanding", "excellent", "fantastic", "brilliant", "perfect", "amazing"],
}
PRODUCTS = [
    "blender",
    "kettle",
    "lamp",
    "backpack",
    "headset",
    "charger",
    "keyboard",
    "toaster",
    "jacket",
    "tent",
    "mouse",
    "speaker",
    "camera",
    "drill",
    "pillow",
    "bottle",
]
ASPECTS = [
    "the build",
    "the price",
    "the battery",
    "the design",
    "the sound",
    "the fit",
    "the delivery",
    "the manual",
    "the handle",
    "the finish",
    "the size",
    "the colour",
]
OPENINGS = [
    "I bought this {p} last month.",
    "The {p} arrived today.",
    "Got the {p} as a gift.",
    "We use the {p} every day.",
    "This {p} replaced my old one.",
]
CLAUSES = ["{a} is {w}.", "{a} feels {w}.", "I find {a} {w}.", "Honestly, {a} seems {w}."]


def rating_for(scores: list[int]) -> int:
    """Round half away from zero, so the mapping is symmetric around 3 stars."""
    mean = sum(scores) / len(scores)
    return 3 + int(math.copysign(math.floor(abs(mean) + 0.5), mean))


def make_review(rng: random.Random, rating: int) -> str:
    while True:  # rejection sampling: draw adjectives near the target until the mean rounds to it
        k = rng.randint(2, 4)
        scores = [max(-2, min(2, rating - 3 + rng.choice((-1, 0, 0, 1)))) for _ in range(k)]
        if rating_for(scores) == rating:
            break
    aspects = rng.sample(ASPECTS, k)
    parts = [rng.choice(OPENINGS).format(p=rng.choice(PRODUCTS))]
    for aspect, score in zip(aspects, scores):
        clause = rng.choice(CLAUSES).format(a=aspect, w=rng.choice(ADJECTIVES[score]))
        parts.append(clause[0].upper() + clause[1:])
    return " ".join(parts) + f"{ANSWER_PREFIX} {rating}"


def make_reviews(n: int, seed: int) -> list[str]:
    """n reviews with balanced ratings (each rating n/5 times, shuffled), reproducible by seed."""
    rng = random.Random(seed)
    ratings = [1 + i % 5 for i in range(n)]
    rng.shuffle(ratings)
    return [make_review(rng, r) for r in ratings]


def make_documents(n: int, seed: int, min_reviews: int = 8, max_reviews: int = 64) -> list[str]:
    """n long documents, each a run of reviews (about 30 tokens each with the project's tokenizer,
    so 8-64 reviews give roughly 256-2048 tokens): variable-length data for throughput and memory
    measurements. Each still ends with a rating, so accuracy stays meaningful."""
    rng = random.Random(seed)
    reviews = make_reviews(n * (min_reviews + max_reviews) // 2 + max_reviews, seed)
    docs, start = [], 0
    for _ in range(n):
        k = rng.randint(min_reviews, max_reviews)
        docs.append(" ".join(reviews[start : start + k]))
        start = (start + k) % (len(reviews) - max_reviews)
    return docs
