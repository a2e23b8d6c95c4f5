"""Prompt sets. ``SIMPLE_ANIMALS`` is the animal-name list of DDPO's ``simple_animals`` prompt function
(ddpo-pytorch ``assets/simple_animals.txt``), which D3PO and the TailorPO paper train on."""

SIMPLE_ANIMALS: list[str] = """
cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf lizard
beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog chicken duck goose bee pig
turkey fly llama camel bat gorilla hedgehog kangaroo snail hippopotamus cheetah crocodile lobster octopus
""".split()
