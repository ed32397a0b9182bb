"""The words of the synthetic support log (`support_orders`): message templates per category, with and
without an order number, extra sentences, distractor numbers, fillers, greetings, signatures, and the
names, products and places its slots are filled from."""

# --------------------------------------------------------------------------------------------------
# Templates. {oid} is the order number; other slots are filled at random. TEMPLATES[cat] = (with order
# number, without).
# --------------------------------------------------------------------------------------------------
TEMPLATES: dict[str, tuple[list[str], list[str]]] = {
    "shipping": (
        [
            "Where is my order {oid}? It was supposed to arrive on {date}.",
            "I ordered a {product} last week (order {oid}) and the tracking hasn't updated in {days} days.",
            "Order {oid} still shows 'processing'. Can you tell me when it will ship?",
            "{oid} - not delivered yet. Please advise.",
            "My package for order {oid} says delivered but I never got it. I checked with my neighbors and the front desk.",
            "Can I change the shipping address on {oid}? I'm moving to {city} next week.",
            "I need order {oid} by {fdate} for a birthday. Is expedited shipping possible?",
            "The carrier gave me tracking number {tracking} but it doesn't work on their site. My order number is {oid}.",
            "any update on {oid}?",
            "It's been {days} days since I placed order {oid} and nothing has arrived.",
            "I only received part of my order. The {product} from {oid} is missing from the box.",
            "Please hold the shipment for {oid} if it hasn't left the warehouse yet, I'll be away until {fdate}.",
            "Why is {oid} being shipped from overseas? The site said {days}-day delivery.",
            "Order number: {oid}\nThe status page is blank. Is something wrong?",
            "my tracking says the {product} is stuck in {city} since {date}. order is {oid}",
            "Could you check on {oid} for me? The estimated delivery keeps moving.",
            "The driver left a note saying they couldn't deliver {oid}. How do I reschedule?",
        ],
        [
            "How long does standard shipping usually take to {city}?",
            "I placed an order this morning but never got a confirmation email. Did it go through?",
            "Do you ship to PO boxes? My zip code is {zip}.",
            "The tracking number {tracking} hasn't moved since {date}. Can you check it?",
            "My package was supposed to come yesterday and it didn't. What should I do?",
            "Can you deliver on weekends? I'm not home during the week.",
            "Do you offer free shipping on orders over {amount}?",
        ],
    ),
    "refund": (
        [
            "I'd like a refund for order {oid}. The {product} doesn't fit.",
            "I returned {oid} on {date} and still haven't seen the refund of {amount}.",
            "Please refund {oid}, I cancelled it within the hour.",
            "How do I start a return for order {oid}?",
            "You refunded {amount} for {oid} but I paid {amount2}. Where is the rest?",
            "refund status for {oid}??",
            "I sent back the {product} (order {oid}) two weeks ago. The carrier confirms you received it on {date}.",
            "Can I get store credit instead of a refund for {oid}?",
            "The return label for order {oid} isn't working. Can you send a new one?",
            "I was told my refund for {oid} would take 5-7 business days. It has been {days}.",
            "{oid}: the item arrived after I needed it, I want my money back please",
            "My order {oid} was cancelled on your side but I was still charged {amount}.",
            "Is it too late to return the {product} from order {oid}? It arrived on {date}.",
        ],
        [
            "What is your return policy for opened items?",
            "I want to return a gift but I don't have the order number. Is that possible?",
            "How long do refunds take to show up on a credit card?",
            "I returned something last month and never got my {amount} back. Please help.",
            "Can I return an item bought in a store to the online shop?",
            "Do I have to pay for return shipping?",
        ],
    ),
    "billing": (
        [
            "I was charged twice for order {oid}. Both charges are {amount}.",
            "The invoice for {oid} shows the wrong billing address.",
            "Can you send me a VAT invoice for order {oid}?",
            "My card ending in {last4} was charged {amount} for {oid} but the total at checkout was {amount2}.",
            "Why was I charged a shipping fee on {oid}? I have free shipping.",
            "Please apply my promo code to {oid}, it didn't go through at checkout.",
            "payment for {oid} failed but the money left my account",
            "I need a receipt for {oid} for my expense report.",
            "The tax on order {oid} looks too high, {amount} for a {product}?",
            "I paid with PayPal for {oid} and now I see a second charge on my Visa ending {last4}.",
            "Order {oid} was supposed to be paid with my gift card balance, not my credit card.",
            "Can I change the payment method on {oid}? It hasn't shipped yet.",
        ],
        [
            "There's a charge of {amount} from you on my statement from {date} that I don't recognize.",
            "How do I update the credit card on file?",
            "Do you accept Apple Pay?",
            "My card ending in {last4} keeps getting declined at checkout.",
            "Can I split a payment between two cards?",
            "Where can I download my invoices?",
        ],
    ),
    "account": (
        [
            "I can't see order {oid} in my account history.",
            "I placed {oid} as a guest. Can you link it to my account {email}?",
            "After the password reset my order {oid} disappeared from the orders page.",
            "Please move order {oid} to my new account, the old one was {email}.",
        ],
        [
            "I can't log in. The password reset email never arrives.",
            "How do I change the email address on my account to {email}?",
            "Please delete my account and all my data.",
            "My account got locked after too many login attempts.",
            "I want to unsubscribe from the marketing emails.",
            "How do I change my phone number? The new one is {phone}.",
            "The two-factor codes are being sent to my old number {phone}.",
            "Can I merge my two accounts? One of them uses {email}.",
            "someone changed my password?? i didnt do it",
            "Where can I update the address in my profile? My new zip is {zip}.",
            "The app keeps logging me out every few minutes.",
            "I never got the verification link for my new account.",
            "How do I stop the site from saving my card details?",
        ],
    ),
    "product_question": (
        [
            "I ordered the {product} ({oid}). Does it come with batteries?",
            "Is the {product} in order {oid} the new model or the older one?",
            "Order {oid}: the manual for the {product} is missing, where can I download it?",
            "Can I still add a warranty to the {product} I bought in {oid}?",
        ],
        [
            "Is the {product} waterproof?",
            "Does the {product} come in blue?",
            "When will the {product} be back in stock?",
            "What is the warranty on the {product}?",
            "Is the {product} compatible with an iPhone 15?",
            "What are the dimensions of the {product}? It has to fit on a 30 inch shelf.",
            "Can I buy a replacement charger for the {product}?",
            "Do you sell gift cards?",
            "The {product} is {amount} right now. Will the price drop for Black Friday?",
            "Is the {product} made in the USA?",
            "How do I clean the {product}?",
            "Does the {product} work with 220V outlets?",
        ],
    ),
    "damaged_item": (
        [
            "The {product} from order {oid} arrived with a cracked screen.",
            "The box was crushed and the {product} inside is broken. Order {oid}.",
            "Order {oid} arrived damaged. I attached photos.",
            "My {product} stopped working after {days} days. Order number {oid}.",
            "{oid} - the {product} arrived dented, I want a replacement not a refund",
            "Half of the items in {oid} are wet, the package was left in the rain.",
            "The glass on the {product} I got (order {oid}) was shattered.",
            "Received the wrong color and it's scratched too. Order: {oid}",
            "the {product} in {oid} has a big scratch on the side",
            "The seal on the {product} was broken when it arrived, order {oid}.",
            "The {product} I received was damaged in transit. The order number is {oid}, delivered {date}.",
            "It arrived in pieces. {oid}.",
        ],
        [
            "My {product} arrived broken. I don't have the order number handy, it was delivered {date}.",
            "The box was soaking wet when it arrived. What do I do?",
        ],
    ),
    "fraud_report": (
        [
            "I did not place order {oid}. Someone is using my account!",
            "There's an order {oid} on my account shipping to {city} that I never made.",
            "Please cancel {oid} immediately, my card was stolen.",
            "I got a confirmation email for {oid} but I didn't order anything.",
            "Fraud alert: order {oid} was placed with my card ending {last4}.",
            "URGENT - unauthorized order {oid}, please stop it",
        ],
        [
            "I got a text from {phone} claiming to be you and asking for my password. Is that real?",
            "Someone changed the email on my account and placed orders I didn't make.",
            "I received a phishing email that looks like it's from your company.",
            "My bank flagged a charge of {amount} from your store that I didn't make.",
            "Is this a scam? Someone called me from {phone} saying I won a gift card.",
            "There are orders in my history I never placed. Please lock my account.",
        ],
    ),
}

# Extra sentences without any order number, per category (context a customer adds).
EXTRAS = {
    "shipping": [
        "I really need it before the weekend.",
        "This is the second time this has happened.",
        "The tracking page just says 'label created'.",
        "I've been waiting at home all day.",
    ],
    "refund": [
        "I've already printed the label.",
        "The item is unused and still in the original packaging.",
        "I'd prefer the money back on my original card.",
        "Honestly I'm pretty disappointed.",
    ],
    "billing": [
        "Please fix this as soon as possible.",
        "My bank says the charge is still pending.",
        "I need this sorted before my statement closes.",
        "I checked my statement twice.",
    ],
    "account": [
        "I've tried on both the app and the website.",
        "I cleared my cookies already.",
        "This is really frustrating.",
        "Please get back to me by email.",
    ],
    "product_question": [
        "I'm thinking of buying two.",
        "The product page doesn't say.",
        "It's meant to be a gift.",
        "Thanks in advance for your help.",
    ],
    "damaged_item": [
        "I have pictures if you need them.",
        "The outer box looked fine.",
        "I'd like this resolved quickly.",
        "I've kept all the packaging.",
    ],
    "fraud_report": [
        "I've already called my bank.",
        "Please treat this as urgent.",
        "I changed my password just now.",
        "I am very worried about this.",
    ],
}

# Sentences carrying numbers that are NOT order numbers.
DISTRACTORS = [
    "You can reach me at {phone}.",
    "I paid {amount} for it.",
    "My zip code is {zip}, in case that matters.",
    "The tracking number is {tracking}.",
    "Call me on {phone} after 5pm.",
    "My previous ticket was {ticketref}.",
    "I've been a customer since {year}.",
    "It was delivered on {date}.",
    "The total came to {amount}.",
    "I live at {street}.",
]

FILLERS = [
    "I hope you're having a good day.",
    "I'm sorry for the long message but I want to explain everything.",
    "I've shopped with you for years and never had a problem before.",
    "My sister recommended your store to me.",
    "I already tried the help center but it didn't answer my question.",
    "I also chatted with someone last week but the chat disconnected.",
    "To be honest I almost gave up on this.",
    "I work nights so email is best for me.",
    "It's not a huge deal but I'd like to understand what happened.",
    "The website was really slow when I was checking out, not sure if that's related.",
    "Anyway, I appreciate any help you can give.",
    "I'm not very good with computers so bear with me.",
]

GREETINGS = {
    "email": ["Hi,", "Hello,", "Hi there,", "Good morning,", "Dear Support,", "Dear Sir or Madam,",
              "To whom it may concern,", "Hello team,", "Hi {name} here.", "Good afternoon,"],
    "chat": ["hi", "hello", "hey", "Hi!", "hi there,", "Hello,", "hi,", "Hey!", "good morning"],
    "web_form": ["Hi,", "Hello,", "Hi team,", "Dear customer service,"],
}
SIGNATURES = {
    "email": ["Thanks,\n{name}", "Regards,\n{name} {last}", "Thank you!\n{name}", "Best,\n{name}",
              "Sent from my iPhone", "Cheers,\n{name}", "Many thanks,\n{name} {last}\n{phone}",
              "Kind regards,\n{name} {last}", "- {name}", "Thanks in advance."],
    "chat": ["thanks", "thx", "ty", "thank you", "thanks!"],
    "web_form": ["Thanks, {name}", "{name} {last}", "Thank you.", "{name} {last}, {phone}"],
}

FIRST = ["Emma", "Liam", "Olivia", "Noah", "Ava", "Lucas", "Mia", "Ethan", "Sofia", "Mason", "Chloe",
         "James", "Grace", "Daniel", "Priya", "Omar", "Hannah", "Wei", "Carlos", "Fatima", "Jonas", "Aisha",
         "Marco", "Yuki", "Peter", "Linda", "Karen", "Raj", "Nina", "Tom"]
LAST = ["Smith", "Garcia", "Nguyen", "Muller", "Johnson", "Kowalski", "Rossi", "Patel", "Kim", "Brown",
        "Lopez", "Schmidt", "Dubois", "Okafor", "Silva", "Tanaka", "Martin", "Evans"]
PRODUCTS = ["wireless headphones", "coffee grinder", "yoga mat", "desk lamp", "phone case", "air fryer",
            "running shoes", "backpack", "smart watch", "blender", "winter jacket", "bluetooth speaker",
            "standing desk", "electric kettle", "gaming mouse", "throw blanket", "water bottle",
            "baby monitor", "robot vacuum", "office chair", "camping tent", "hair dryer", "mechanical keyboard",
            "kids' bike", "cast iron pan"]
CITIES = ["Chicago", "Austin", "Denver", "Seattle", "Boston", "Atlanta", "Phoenix", "Portland", "Miami",
          "Toronto", "Dublin", "Manchester", "Lyon", "Hamburg"]
STREETS = ["Oak Street", "Maple Ave", "Main St", "Pine Road", "Elm Street", "Lake Drive", "Hill Lane"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
