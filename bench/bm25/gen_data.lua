-- gen_data.lua OUTDIR [PASSAGES] - the benchmark's knowledge base and
-- questions, deterministic (our own word lists and templates, no downloads):
--   passages.jsonl   PASSAGES (10,000) support/knowledge passages, about half
--                    Russian, half English: {"id":"p00001","lang":"ru","text":"..."}
--   queries.json     about 200 questions in both languages, phrased as
--                    customers ask them, with other inflected forms than the
--                    passages use (deliveries, заказов, оплатил, ...)
--   query_topics.json  the topic of each question ("en4": English refunds),
--                    for the report's topic precision: the passages' topics
--                    are in passages.jsonl
--   stopwords.json   slm.bm25's stop words, for the peer's processTerm
--   analyzed.json    bm25.terms() of each passage and question (the report's
--                    check of the scoring alone)
-- Both contenders read these same files.
local cjson = require "cjson"
local out, count = arg[1], tonumber(arg[2] or "10000")
assert(out, "usage: gen_data.lua OUTDIR [PASSAGES]")
os.execute("mkdir -p '" .. out .. "'")

-- Park-Miller: exact in doubles, so any Lua gives the same data.
local seed = 20261201
local function rnd(n) -- 1..n
  seed = (seed * 16807) % 2147483647
  return seed % n + 1
end
local function pick(t) return t[rnd(#t)] end

local function words(s) local t = {} for w in s:gmatch("[^|]+") do t[#t + 1] = w:match("^%s*(.-)%s*$") end return t end

-- English -------------------------------------------------------------------
local EN = {}
EN.product = words [[wireless headphones|smartphone|laptop|coffee machine|robot vacuum|
  electric kettle|smart watch|gaming console|tablet|washing machine|dishwasher|
  air fryer|bluetooth speaker|office chair|standing desk|mattress|winter jacket|
  running shoes|backpack|microwave oven|blender|e-book reader|action camera|
  drone|printer|monitor|keyboard|router|power bank|hair dryer|electric toothbrush|
  baby stroller|car seat|bicycle|tent|sofa|refrigerator|TV set|projector|
  sewing machine|electric scooter|vacuum flask|frying pan|knife set|yoga mat]]
EN.city = words [[London|Manchester|Berlin|Warsaw|Prague|Vienna|Madrid|Lisbon|
  Dublin|Amsterdam|Helsinki|Riga|Vilnius|Tallinn|Oslo|Copenhagen|Stockholm|Paris|
  Milan|Zurich|Brussels|Budapest|Bucharest|Sofia|Athens|New York|Toronto|Chicago]]
EN.carrier = words [[FastPost|ParcelJet|Northway Express|CityCourier|BlueBox Logistics|SwiftLine]]
EN.plan = words [[Basic|Plus|Premium|Family|Business|Student]]
EN.method = words [[credit card|debit card|PayPal|Apple Pay|Google Pay|bank transfer|gift card|cash on delivery]]
EN.day = words [[Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday]]

EN.topics = {
  { -- delivery
    "Delivery to {city} takes {n} to {m} business days.",
    "We deliver orders to {city} with {carrier}; the courier calls an hour before arrival.",
    "Standard delivery is free for orders over {amount} euros, express delivery costs {small} euros.",
    "Deliveries are made from Monday to Saturday between 9 am and 9 pm.",
    "If nobody is at home, the courier leaves a notice and tries again on the next business day.",
    "Large items such as a {product} are delivered to the door of your flat, not only to the building entrance.",
    "You can choose a delivery slot at checkout; slots for {city} open {n} days in advance.",
    "Delivered parcels are photographed by the courier, and the photo appears in your order history.",
    "Delays of one or two days are possible during holidays and sales.",
    "Same-day delivery is available in {city} for orders placed before noon.",
  },
  { -- tracking
    "You can track your order in the app under My orders, or with the tracking link we email after shipping.",
    "The tracking number is sent by SMS and email as soon as the parcel leaves our warehouse in {city}.",
    "Tracking updates can take up to {n} hours to appear after the parcel is handed to {carrier}.",
    "If the status has not changed for more than {n} days, contact support with your order number.",
    "Order {order} was shipped from {city} on {day} and is expected within {n} days.",
    "The status In transit means the parcel is on its way; Ready for pickup means it waits at the pickup point.",
    "Tracking is not available for letters and small items sent as standard mail.",
  },
  { -- returns
    "You can return a {product} within {d30} days of delivery if it was not used and is in its original packaging.",
    "To start a return, open the order in your account and choose Return items.",
    "Returns are free when the item is faulty or we sent the wrong item; otherwise the return shipping costs {small} euros.",
    "Bring the parcel to any {carrier} pickup point and show the return code from the app.",
    "Some items cannot be returned: underwear, opened cosmetics, gift cards and software keys.",
    "Once the returned item reaches our warehouse in {city}, it is checked within {n} business days.",
    "If you returned several items from one order, each of them is checked separately.",
  },
  { -- refunds
    "Refunds go back to the payment method you used: card refunds take {n} to {m} business days.",
    "We refund the full price of the item and the original delivery cost if the whole order is returned.",
    "If you paid with a gift card, the refund is added to your gift card balance.",
    "A refund for order {order} is issued after the warehouse confirms the return.",
    "Partial refunds are possible when an item arrives damaged and you decide to keep it.",
    "You will receive an email when your refund has been processed; the bank may need a few more days.",
    "Refunded amounts appear on your statement as a separate credit, not as a cancelled payment.",
  },
  { -- payment
    "We accept {method}, {method2} and {method3}.",
    "Payment by {method} is confirmed instantly; bank transfers take up to {n} business days.",
    "If your payment was declined, check the card limit and that online payments are enabled by your bank.",
    "Cash on delivery is available for orders up to {amount} euros.",
    "You can pay in {n} monthly instalments without interest for orders over {amount} euros.",
    "The amount is reserved on your card when you order and charged when the order is shipped.",
    "Payments are processed securely; we never store the full card number.",
  },
  { -- billing, double charges
    "If you were charged twice, one of the charges is usually a reservation that disappears within {n} days.",
    "An unexpected charge can be a renewal of your {plan} subscription; check your account under Billing.",
    "Invoices are available in your account and are sent by email after each payment.",
    "To get an invoice with your company details, add the VAT number before paying.",
    "Charges in another currency are converted by your bank, and the bank may add a fee.",
    "If a charge is still pending after {n} days, send us a screenshot of the statement.",
  },
  { -- subscriptions
    "The {plan} plan costs {small} euros a month and includes free delivery on every order.",
    "You can cancel your subscription at any time; it stays active until the end of the paid period.",
    "Subscriptions renew automatically; we remind you by email {n} days before the renewal.",
    "Switching from {plan} to {plan2} takes effect immediately, and the price difference is prorated.",
    "A cancelled subscription can be restored within {d30} days with all its benefits.",
    "Students get the {plan} plan at half price after confirming their status.",
  },
  { -- account and password
    "To reset your password, tap Forgot password on the sign-in screen and follow the link we email you.",
    "The password reset link is valid for {n} hours; request a new one if it has expired.",
    "Passwords must be at least {n8} characters long and contain a letter and a digit.",
    "If you do not receive the email, check the spam folder and that the address is spelled correctly.",
    "You can change your email address and phone number in Account settings.",
    "After {n} failed sign-in attempts the account is locked for 30 minutes.",
    "Two-factor authentication adds a code sent by SMS to every sign-in from a new device.",
    "To delete your account, go to Privacy settings; your orders and invoices are kept as the law requires.",
  },
  { -- promo codes
    "A promo code is entered at checkout in the Discount field and applies to eligible items only.",
    "Promo codes cannot be combined, and they do not apply to gift cards.",
    "The code WELCOME{n} gives {pct} percent off your first order over {amount} euros.",
    "If your promo code does not work, check its expiry date and the minimum order amount.",
    "Loyalty points can be spent like money: {n} points equal one euro.",
    "Points for an order are credited {n} days after delivery, once the return period has passed.",
  },
  { -- warranty and repairs
    "Every {product} comes with a {n2}-year manufacturer warranty.",
    "To make a warranty claim, describe the fault and attach photos in the order page.",
    "Repairs under warranty are free; the service centre in {city} usually needs {n} to {m} weeks.",
    "If the item cannot be repaired, we replace it or refund the purchase price.",
    "Damage caused by water, drops or unauthorised repairs is not covered by the warranty.",
    "Keep the receipt or the invoice: it is your proof of purchase for the warranty.",
  },
  { -- cancellation and changes
    "You can cancel an order free of charge until it is shipped.",
    "Once the order has been shipped, it cannot be cancelled, but you can return it after delivery.",
    "To change the delivery address, contact us before the parcel is handed to the courier.",
    "Cancelled orders paid by card are refunded within {n} business days.",
    "If only some items are out of stock, we ship the rest and cancel the missing items automatically.",
  },
  { -- damaged or missing items
    "If your {product} arrived damaged, take photos of the item and the packaging and report it within {n} days.",
    "If an item is missing from the parcel, check whether the order was split into several shipments.",
    "We send a replacement for damaged items at no cost once the photos are reviewed.",
    "Do not throw away the packaging until the damage claim is settled.",
  },
  { -- stock and pickup
    "The {product} is currently out of stock; tap Notify me to get an email when it is back.",
    "Pickup points in {city} keep parcels for {n} days; after that the parcel is returned to us.",
    "To collect a parcel, show the pickup code and an ID document.",
    "Store pickup is free, and most orders are ready for pickup within {n} hours.",
    "Pre-ordered items are charged when they are shipped, not when you place the pre-order.",
  },
  { -- app and notifications
    "If the app does not open, update it to the latest version and restart your phone.",
    "Push notifications about order status can be turned on in the app settings.",
    "If you do not receive SMS codes, check that your phone number is correct and that messages from short numbers are not blocked.",
    "The app works on phones with Android {n8} or iOS {n15} and newer.",
  },
}

EN.title = {
  "Delivery times and costs", "Tracking an order", "Returns", "Refunds",
  "Payment methods", "Charges and invoices", "Subscriptions", "Account and password",
  "Promo codes and points", "Warranty and repairs", "Cancelling or changing an order",
  "Damaged or missing items", "Stock and pickup points", "The mobile app",
}

EN.queries = { -- { topic, question, ... }: the topic the question is about
  { 1, "When will my deliveries arrive in {city}?", "how long does delivery take to {city}",
    "Is delivery free?", "How much does express delivery cost?",
    "The courier didn't deliver my parcel, what now?", "Do you deliver on Sundays?" },
  { 2, "where is my order {order}", "How can I track orders?", "tracking number not working",
    "My parcel has been in transit for a week", "Order {order} status" },
  { 3, "How do I return a {product}?", "Can I return opened cosmetics?", "Returning items bought as gifts" },
  { 4, "How long do refunds take?", "I haven't been refunded yet",
    "when will I get my money back for the returned {product}", "Refunding a gift card purchase",
    "was refunded only partially" },
  { 5, "What payment methods do you accept?", "Can I pay with PayPal?", "My card payment was declined",
    "Do you offer instalments?", "payments by bank transfer" },
  { 6, "I was charged twice", "Why was I charged for a subscription?", "Where can I download invoices?",
    "invoice with VAT number for my company", "charged in the wrong currency" },
  { 7, "How do I cancel my {plan} subscription?", "subscription renewed without warning",
    "Switch my plan from {plan} to {plan2}", "student discount on subscriptions" },
  { 8, "I forgot my password", "Password reset link expired", "reset passwords for my account",
    "I didn't receive the password reset email", "How do I change my email address?",
    "My account is locked after failed sign-ins", "delete my account and data" },
  { 9, "promo code not working", "Can I use two promo codes?", "How many loyalty points do I get?" },
  { 10, "warranty for a {product}", "My {product} stopped working after two months",
    "repair under warranty how long", "water damaged phone warranty" },
  { 11, "How do I cancel an order?", "Can I cancel an order that was already shipped?",
    "change delivery address after ordering", "cancelled order refund" },
  { 12, "My {product} arrived damaged", "an item is missing from my parcel", "broken items replacement" },
  { 13, "When will the {product} be back in stock?", "How long do pickup points keep parcels?",
    "What do I need to collect a parcel?" },
  { 14, "SMS codes are not coming", "the app keeps crashing", "notifications about deliveries",
    "Which Android versions does the app support?" },
}

-- Russian ---------------------------------------------------------------
local RU = {}
-- product: именительный | винительный | родительный
RU.product = {
  { "смартфон", "смартфон", "смартфона" }, { "ноутбук", "ноутбук", "ноутбука" },
  { "кофемашина", "кофемашину", "кофемашины" }, { "стиральная машина", "стиральную машину", "стиральной машины" },
  { "посудомоечная машина", "посудомоечную машину", "посудомоечной машины" },
  { "робот-пылесос", "робот-пылесос", "робота-пылесоса" }, { "электрочайник", "электрочайник", "электрочайника" },
  { "умные часы", "умные часы", "умных часов" }, { "планшет", "планшет", "планшета" },
  { "телевизор", "телевизор", "телевизора" }, { "холодильник", "холодильник", "холодильника" },
  { "микроволновая печь", "микроволновую печь", "микроволновой печи" }, { "блендер", "блендер", "блендера" },
  { "беспроводные наушники", "беспроводные наушники", "беспроводных наушников" },
  { "игровая приставка", "игровую приставку", "игровой приставки" }, { "принтер", "принтер", "принтера" },
  { "монитор", "монитор", "монитора" }, { "роутер", "роутер", "роутера" },
  { "пауэрбанк", "пауэрбанк", "пауэрбанка" }, { "фен", "фен", "фена" },
  { "электросамокат", "электросамокат", "электросамоката" }, { "велосипед", "велосипед", "велосипеда" },
  { "детская коляска", "детскую коляску", "детской коляски" }, { "автокресло", "автокресло", "автокресла" },
  { "диван", "диван", "дивана" }, { "матрас", "матрас", "матраса" }, { "палатка", "палатку", "палатки" },
  { "зимняя куртка", "зимнюю куртку", "зимней куртки" }, { "кроссовки", "кроссовки", "кроссовок" },
  { "рюкзак", "рюкзак", "рюкзака" }, { "сковорода", "сковороду", "сковороды" },
  { "мультиварка", "мультиварку", "мультиварки" }, { "электробритва", "электробритву", "электробритвы" },
  { "проектор", "проектор", "проектора" }, { "швейная машина", "швейную машину", "швейной машины" },
  { "офисное кресло", "офисное кресло", "офисного кресла" }, { "аэрогриль", "аэрогриль", "аэрогриля" },
  { "электронная книга", "электронную книгу", "электронной книги" }, { "экшн-камера", "экшн-камеру", "экшн-камеры" },
  { "квадрокоптер", "квадрокоптер", "квадрокоптера" },
}
-- city: именительный | предложный (в ...) | родительный (из ...)
RU.city = {
  { "Москва", "Москве", "Москвы" }, { "Санкт-Петербург", "Санкт-Петербурге", "Санкт-Петербурга" },
  { "Казань", "Казани", "Казани" }, { "Новосибирск", "Новосибирске", "Новосибирска" },
  { "Екатеринбург", "Екатеринбурге", "Екатеринбурга" }, { "Нижний Новгород", "Нижнем Новгороде", "Нижнего Новгорода" },
  { "Самара", "Самаре", "Самары" }, { "Ростов-на-Дону", "Ростове-на-Дону", "Ростова-на-Дону" },
  { "Уфа", "Уфе", "Уфы" }, { "Красноярск", "Красноярске", "Красноярска" }, { "Пермь", "Перми", "Перми" },
  { "Воронеж", "Воронеже", "Воронежа" }, { "Волгоград", "Волгограде", "Волгограда" },
  { "Краснодар", "Краснодаре", "Краснодара" }, { "Саратов", "Саратове", "Саратова" },
  { "Тюмень", "Тюмени", "Тюмени" }, { "Ижевск", "Ижевске", "Ижевска" }, { "Барнаул", "Барнауле", "Барнаула" },
  { "Иркутск", "Иркутске", "Иркутска" }, { "Хабаровск", "Хабаровске", "Хабаровска" },
  { "Владивосток", "Владивостоке", "Владивостока" }, { "Ярославль", "Ярославле", "Ярославля" },
  { "Томск", "Томске", "Томска" }, { "Омск", "Омске", "Омска" }, { "Калининград", "Калининграде", "Калининграда" },
  { "Тула", "Туле", "Тулы" }, { "Сочи", "Сочи", "Сочи" }, { "Челябинск", "Челябинске", "Челябинска" },
}
RU.carrier = words [[СкороПочта|ПосылкаЭкспресс|ГородКурьер|СеверЛайн|ТрансДоставка|БыстроБокс]]
RU.plan = words [[Базовый|Плюс|Премиум|Семейный|Бизнес|Студенческий]]
RU.method = words [[банковской картой|картой «Мир»|через СБП|электронным кошельком|подарочным сертификатом|наличными курьеру|по счёту для юрлиц]]
RU.day = words [[понедельник|вторник|среду|четверг|пятницу|субботу|воскресенье]]

RU.topics = {
  { -- доставка
    "Доставка в {city_loc} занимает от {n} до {m} рабочих дней.",
    "Заказы в {city_loc} доставляет служба {carrier}; курьер звонит за час до приезда.",
    "Стандартная доставка бесплатна при заказе от {amount00} рублей, экспресс-доставка стоит {small00} рублей.",
    "Доставка работает с понедельника по субботу с 9 до 21 часа.",
    "Если вас нет дома, курьер оставит извещение и привезёт заказ на следующий рабочий день.",
    "Крупногабаритные товары, например {product_nom}, доставляем до двери квартиры, а не только до подъезда.",
    "Интервал доставки можно выбрать при оформлении заказа; в {city_loc} слоты открываются за {n} дня.",
    "Доставленные посылки курьер фотографирует, и снимок появляется в истории заказов.",
    "В праздники и во время распродаж доставка может задержаться на один-два дня.",
    "Доставка в день заказа доступна в {city_loc} для заказов, оформленных до полудня.",
    "Доставкой товаров из {city_gen} в другие регионы занимается {carrier}.",
  },
  { -- отслеживание
    "Отследить заказ можно в приложении в разделе «Мои заказы» или по ссылке из письма об отправке.",
    "Трек-номер приходит в СМС и на почту, как только посылка покидает склад в {city_loc}.",
    "Информация об отслеживании обновляется в течение {n} часов после передачи посылки в {carrier}.",
    "Если статус заказа не меняется больше {n} дней, напишите в поддержку и укажите номер заказа.",
    "Заказ {order} отправлен из {city_gen} в {day} и будет доставлен в течение {n} дней.",
    "Статус «В пути» означает, что посылка едет к вам, а «Готов к выдаче» — что она ждёт в пункте выдачи.",
    "Письма и мелкие отправления обычной почтой отследить нельзя.",
  },
  { -- возврат
    "Вернуть {product_acc} можно в течение {d30} дней после получения, если товар не был в употреблении и сохранена упаковка.",
    "Чтобы оформить возврат, откройте заказ в личном кабинете и нажмите «Вернуть товары».",
    "Возврат бесплатный, если товар бракованный или мы прислали не тот товар; в остальных случаях обратная доставка стоит {small00} рублей.",
    "Отнесите посылку в любой пункт выдачи {carrier} и покажите код возврата из приложения.",
    "Некоторые товары вернуть нельзя: нижнее бельё, вскрытую косметику, подарочные сертификаты и ключи программ.",
    "Когда возвращённый товар поступит на склад в {city_loc}, его проверят в течение {n} рабочих дней.",
    "Если вы вернули несколько товаров из одного заказа, каждый из них проверяется отдельно.",
  },
  { -- возврат денег
    "Деньги возвращаются тем же способом, которым вы платили: на карту — за {n}–{m} рабочих дней.",
    "При возврате всего заказа мы возвращаем полную стоимость товаров и первоначальной доставки.",
    "Если вы оплатили заказ подарочным сертификатом, деньги вернутся на баланс сертификата.",
    "Деньги за заказ {order} будут возвращены после того, как склад подтвердит возврат.",
    "Частичный возврат денег возможен, если товар пришёл повреждённым и вы решили его оставить.",
    "Когда возврат средств будет оформлен, придёт письмо; банку может понадобиться ещё несколько дней.",
    "Возвращённая сумма отображается в выписке отдельным зачислением, а не отменой платежа.",
  },
  { -- оплата
    "Оплатить заказ можно {method}, {method2} или {method3}.",
    "Оплата {method} подтверждается сразу, банковский перевод идёт до {n} рабочих дней.",
    "Если оплата не прошла, проверьте лимит по карте и разрешены ли банком платежи в интернете.",
    "Оплата при получении доступна для заказов до {amount00} рублей.",
    "Рассрочка на {n} месяцев без переплаты доступна для заказов от {amount00} рублей.",
    "Сумма заказа блокируется на карте при оформлении и списывается при отправке заказа.",
    "Платежи проходят по защищённому соединению; полный номер карты мы не храним.",
    "Если вы оплатили заказ, а статус не изменился, подождите {n} минут и обновите страницу.",
  },
  { -- списания
    "Если деньги списали дважды, одно из списаний обычно является блокировкой, которая исчезнет в течение {n} дней.",
    "Неожиданное списание может быть продлением подписки {plan}; проверьте раздел «Платежи» в личном кабинете.",
    "Чеки и счета доступны в личном кабинете и приходят на почту после каждой оплаты.",
    "Чтобы получить счёт на организацию, укажите ИНН и реквизиты компании до оплаты.",
    "Списания в другой валюте конвертирует ваш банк, он же может взять комиссию.",
    "Если списание висит больше {n} дней, пришлите нам скриншот выписки.",
  },
  { -- подписки
    "Подписка {plan} стоит {small00} рублей в месяц и включает бесплатную доставку всех заказов.",
    "Отменить подписку можно в любой момент; она действует до конца оплаченного периода.",
    "Подписки продлеваются автоматически; мы напоминаем о продлении письмом за {n} дня.",
    "Переход с тарифа {plan} на {plan2} действует сразу, разница в цене пересчитывается.",
    "Отменённую подписку можно восстановить в течение {d30} дней со всеми преимуществами.",
    "Студенты получают подписку за полцены после подтверждения статуса.",
  },
  { -- аккаунт и пароль
    "Чтобы сбросить пароль, нажмите «Забыли пароль?» на экране входа и перейдите по ссылке из письма.",
    "Ссылка для восстановления пароля действует {n} часов; если срок истёк, запросите новую.",
    "Пароль должен быть не короче {n8} символов и содержать букву и цифру.",
    "Если письмо не пришло, проверьте папку «Спам» и правильность адреса почты.",
    "Изменить адрес электронной почты и номер телефона можно в настройках профиля.",
    "После {n} неудачных попыток входа аккаунт блокируется на 30 минут.",
    "Двухфакторная аутентификация добавляет код из СМС при каждом входе с нового устройства.",
    "Удалить аккаунт можно в настройках конфиденциальности; заказы и чеки хранятся столько, сколько требует закон.",
  },
  { -- промокоды
    "Промокод вводится при оформлении заказа в поле «Скидка» и действует только на подходящие товары.",
    "Промокоды не суммируются и не действуют на подарочные сертификаты.",
    "Промокод ПРИВЕТ{n} даёт скидку {pct} % на первый заказ от {amount00} рублей.",
    "Если промокод не работает, проверьте срок его действия и минимальную сумму заказа.",
    "Бонусными баллами можно оплатить до {pct} % стоимости заказа: один балл равен одному рублю.",
    "Баллы за заказ начисляются через {n} дней после получения, когда закончится срок возврата.",
  },
  { -- гарантия
    "На {product_acc} действует гарантия производителя {n2} года.",
    "Чтобы обратиться по гарантии, опишите неисправность и приложите фотографии на странице заказа.",
    "Гарантийный ремонт бесплатный; сервисный центр в {city_loc} обычно ремонтирует за {n}–{m} недели.",
    "Если товар нельзя отремонтировать, мы заменим его или вернём деньги.",
    "Гарантия не распространяется на повреждения от воды, падений и неавторизованного ремонта.",
    "Сохраняйте чек или счёт: это подтверждение покупки для гарантии.",
  },
  { -- отмена и изменения
    "Отменить заказ можно бесплатно, пока он не передан в доставку.",
    "После отправки заказ отменить нельзя, но его можно вернуть после получения.",
    "Чтобы изменить адрес доставки, свяжитесь с нами до передачи посылки курьеру.",
    "Деньги за отменённые заказы, оплаченные картой, возвращаются в течение {n} рабочих дней.",
    "Если части товаров нет в наличии, мы отправим остальные, а недостающие отменим автоматически.",
  },
  { -- повреждения
    "Если товар пришёл с повреждениями, сфотографируйте товар и упаковку и сообщите нам в течение {n} дней.",
    "Если в посылке не хватает товара, проверьте, не разделён ли заказ на несколько отправлений.",
    "Замену повреждённого товара отправляем бесплатно после проверки фотографий.",
    "Не выбрасывайте упаковку, пока претензия о повреждении не рассмотрена.",
  },
  { -- наличие и пункты выдачи
    "{product_gen} сейчас нет в наличии; нажмите «Сообщить о поступлении», и мы пришлём письмо.",
    "Пункты выдачи в {city_loc} хранят заказы {n} дней, затем посылка возвращается к нам.",
    "Для получения заказа покажите код получения и документ, удостоверяющий личность.",
    "Самовывоз из магазина бесплатный, большинство заказов готовы к выдаче через {n} часа.",
    "Товары по предзаказу оплачиваются при отправке, а не при оформлении предзаказа.",
  },
  { -- приложение и уведомления
    "Если приложение не открывается, обновите его до последней версии и перезагрузите телефон.",
    "Уведомления о статусе заказа включаются в настройках приложения.",
    "Если не приходят коды из СМС, проверьте номер телефона и не заблокированы ли сообщения с коротких номеров.",
    "Приложение работает на телефонах с Android {n8} или iOS {n15} и новее.",
  },
}
RU.title = {
  "Сроки и стоимость доставки", "Отслеживание заказа", "Возврат товара", "Возврат денег",
  "Способы оплаты", "Списания и чеки", "Подписки", "Аккаунт и пароль",
  "Промокоды и баллы", "Гарантия и ремонт", "Отмена и изменение заказа",
  "Повреждённые и недостающие товары", "Наличие и пункты выдачи", "Мобильное приложение",
}

RU.queries = {
  { 1, "Когда будет доставка в {city_loc}?", "сколько дней идет доставка в {city_loc}",
    "Доставка бесплатная?", "Сколько стоит экспресс-доставки?", "курьер не привез заказ что делать",
    "Доставляете ли вы в воскресенье?" },
  { 2, "Где мой заказ {order}?", "Как отследить мои заказы?", "трек-номер не работает",
    "посылка неделю в пути", "Статус заказа {order}" },
  { 3, "Как вернуть {product_acc}?", "можно ли вернуть вскрытую косметику", "возврат подарка" },
  { 4, "Сколько ждать возврата денег?", "мне до сих пор не вернули деньги",
    "когда вернут деньги за {product_acc}", "возврат денег на подарочный сертификат",
    "вернули только часть денег" },
  { 5, "Какие способы оплаты есть?", "можно ли оплатить через СБП", "не проходит оплата картой",
    "есть ли рассрочка", "оплата банковским переводом", "оплатил заказ а статус не изменился" },
  { 6, "Деньги списали два раза", "Почему списали деньги за подписку?", "где скачать чеки",
    "счет на организацию с ИНН", "списание в другой валюте" },
  { 7, "Как отменить подписку {plan}?", "подписка продлилась без предупреждения",
    "перейти с тарифа {plan} на {plan2}", "скидка для студентов на подписки" },
  { 8, "Я забыл пароль", "ссылка для сброса пароля истекла", "не приходит письмо для восстановления пароля",
    "как поменять адрес почты", "аккаунт заблокирован после неудачных попыток входа",
    "удалить аккаунт и данные" },
  { 9, "промокод не работает", "можно ли использовать два промокода", "сколько баллов начисляют за заказы" },
  { 10, "гарантия на {product_acc}", "сломалась техника через два месяца: {product_nom}",
    "сколько длится гарантийный ремонт", "телефон упал в воду гарантия" },
  { 11, "как отменить заказ", "можно ли отменить отправленный заказ",
    "изменить адрес доставки после оформления", "возврат денег за отмененный заказ" },
  { 12, "получил поврежденный товар: {product_nom}", "в посылке не хватает товаров", "замена сломанного товара" },
  { 13, "когда появится в наличии {product_nom}", "сколько хранится заказ в пункте выдачи",
    "что нужно для получения посылки" },
  { 14, "не приходят смс с кодом", "приложение вылетает", "уведомления о доставках",
    "какие версии Android поддерживает приложение" },
}

-- Filling templates -----------------------------------------------------------

local orders = {}
local function order_number()
  local o = tostring(10000 + rnd(89999))
  orders[#orders + 1] = o
  return o
end

local function fill(lang, s)
  local L = lang == "ru" and RU or EN
  local prod = pick(L.product)
  local city = pick(L.city)
  local plan, plan2 = pick(L.plan), pick(L.plan)
  local m1, m2, m3 = pick(L.method), pick(L.method), pick(L.method)
  local n = rnd(5) + 1
  local vals = {
    n = tostring(n), m = tostring(n + rnd(6)), n2 = tostring(rnd(3) + 1), n8 = tostring(rnd(5) + 7),
    n15 = tostring(rnd(4) + 14), d30 = tostring(({ 14, 30, 60, 100 })[rnd(4)]), pct = tostring(rnd(6) * 5),
    amount = tostring(rnd(20) * 10 + 20), small = tostring(rnd(9) + 2) .. ".99",
    amount00 = tostring((rnd(20) + 5) * 100), small00 = tostring(rnd(40) * 10 + 90),
    city = type(city) == "table" and city[1] or city,
    city_loc = type(city) == "table" and city[2] or city, city_gen = type(city) == "table" and city[3] or city,
    product = type(prod) == "table" and prod[1] or prod,
    product_nom = type(prod) == "table" and prod[1] or prod, product_acc = type(prod) == "table" and prod[2] or prod,
    product_gen = type(prod) == "table" and prod[3] or prod,
    carrier = pick(L.carrier), plan = plan, plan2 = plan2, method = m1, method2 = m2, method3 = m3,
    day = pick(L.day),
  }
  s = s:gsub("{order}", order_number)
  s = s:gsub("{([%w_]+)}", function(k) return assert(vals[k], k) end)
  -- a sentence may start with a slot: upper-case its first letter
  return (s:gsub("^[a-z]", string.upper):gsub("^\208([\176-\191])", function(c)
    return "\208" .. string.char(c:byte() - 32)
  end):gsub("^\209([\128-\143])", function(c) return "\208" .. string.char(c:byte() + 32) end))
end

local function passage(lang)
  local L = lang == "ru" and RU or EN
  local ti = rnd(#L.topics)
  local topic = L.topics[ti]
  local parts, used = {}, {}
  if rnd(3) == 1 then parts[1] = L.title[ti] .. "." end
  local want = rnd(4) + 1
  local len = 0
  while #parts < want + 1 and len < 520 do
    local i = rnd(#topic)
    if not used[i] then
      used[i] = true
      local s = fill(lang, topic[i])
      if len + #s > 700 then break end
      parts[#parts + 1] = s
      len = len + #s + 1
    elseif rnd(4) == 1 then
      break
    end
  end
  return table.concat(parts, " "), ti
end

local f = assert(io.open(out .. "/passages.jsonl", "wb"))
for i = 1, count do
  local lang = rnd(2) == 1 and "ru" or "en"
  local text, topic = passage(lang)
  f:write(cjson.encode({ id = string.format("p%05d", i), lang = lang, topic = lang .. topic, text = text }), "\n")
end
f:close()

-- queries: every question once, then two of every three again with other
-- slot values; order numbers from the passages
local queries, qtopics = {}, {}
for _, lang in ipairs { "en", "ru" } do
  local L = lang == "ru" and RU or EN
  for round = 1, 2 do
    local i = 0
    for _, group in ipairs(L.queries) do
      for j = 2, #group do
        i = i + 1
        if round == 1 or i % 3 ~= 0 then
          local s = group[j]:gsub("{order}", function() return orders[rnd(#orders)] end)
          queries[#queries + 1] = fill(lang, s)
          qtopics[#qtopics + 1] = lang .. group[1]
        end
      end
    end
  end
end
f = assert(io.open(out .. "/queries.json", "wb"))
f:write(cjson.encode(queries), "\n")
f:close()
f = assert(io.open(out .. "/query_topics.json", "wb"))
f:write(cjson.encode(qtopics), "\n")
f:close()

local bm25 = require "slm.bm25"
f = assert(io.open(out .. "/stopwords.json", "wb"))
f:write(cjson.encode(bm25.stop_words()), "\n")
f:close()

-- bm25.terms() of every passage and question, for the report's check of the
-- scoring alone (minisearch fed these terms instead of its own analysis)
local analyzed = { passages = {}, queries = {} }
for line in io.lines(out .. "/passages.jsonl") do
  local p = cjson.decode(line)
  analyzed.passages[#analyzed.passages + 1] = bm25.terms(p.text)
end
for i, q in ipairs(queries) do analyzed.queries[i] = bm25.terms(q) end
f = assert(io.open(out .. "/analyzed.json", "wb"))
f:write(cjson.encode(analyzed), "\n")
f:close()
io.stderr:write(string.format("gen_data: %d passages, %d queries in %s\n", count, #queries, out))
