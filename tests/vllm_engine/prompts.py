"""Prompts of varied length for the engine parity tests."""

QUESTIONS = [
    "Hi!",
    "What is the capital of France?",
    "Name three primary colours.",
    "Write a haiku about rain.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "Give me a synonym for happy.",
    "Why is the sky blue? Answer in one sentence.",
    "List the planets of the solar system in order from the sun.",
    "Explain what a hash table is to a ten-year-old.",
    "What are the main differences between a cat and a dog as pets?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Describe how a bicycle works, covering the pedals, chain, gears and brakes.",
    "Write a short product description for a reusable water bottle made of steel.",
    "I have eggs, flour, milk and sugar. Suggest something I could bake and explain the steps briefly.",
    "The meeting was moved from Tuesday to Thursday because the manager was travelling. When is the meeting now?",
    (
        "Read this review and say whether it is positive or negative: The food was cold, the service slow, "
        "and the bill wrong. I will not come back."
    ),
    (
        "A train leaves at 9:15 and the journey takes two hours and fifty minutes. At what time does it arrive? "
        "Show your reasoning step by step."
    ),
    (
        "Here is a list of fruits: apple, banana, cherry, date, elderberry, fig, grape. Which of them are "
        "berries in the botanical sense, and which are not? Keep the answer short."
    ),
    (
        "You are a helpful assistant for a library. A visitor asks where to find books about the history of "
        "ancient Rome, how long they can borrow them, and whether they can renew the loan online. Answer "
        "politely and concisely, inventing reasonable library rules where needed."
    ),
    "Continue the story: The lighthouse keeper had not seen a ship in forty days, until one foggy morning",
]
