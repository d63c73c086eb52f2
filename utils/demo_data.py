"""Embedded demo data, generated here with a fixed seed (never copied from ../shared/data).

Templated facts a tiny T5 can really learn on 2 CPU cores in minutes (single-digit sums and differences, unit
conversion, Chinese numerals, weekdays, months, the number after and before), each fact in several templates, a
few dozen hand-written everyday Q&A pairs, preference triples, triple-extraction examples and C-Eval-shaped
multiple-choice questions. ``HELDOUT`` questions never appear in training, in any generated file: each is one
(template, operands) combination left out, whose fact the model sees in other templates and whose template it
sees with other operands. The demo prints the model's answers to them (tests/test_demo_data.py checks the files).

    python -m utils.demo_data --out_dir data/demo
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pandas as pd

SEED = 20231103
DIGITS = "零一二三四五六七八九"
WEEKDAYS = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
MONTHS = ["一月", "二月", "三月", "四月", "五月", "六月", "七月", "八月", "九月", "十月", "十一月", "十二月"]


def chinese_number(n: int) -> str:
    """0..9999 in Chinese numerals (十二, 一百零五, 两千 is written 二千 for regularity)."""
    if n < 10:
        return DIGITS[n]
    if n < 20:
        return "十" + (DIGITS[n % 10] if n % 10 else "")
    units = [(1000, "千"), (100, "百"), (10, "十")]
    out, zero = "", False
    for value, name in units:
        d = (n // value) % 10
        if d:
            if zero:
                out += "零"
                zero = False
            out += DIGITS[d] + name
        elif out:
            zero = True
    if n % 10:
        if zero:
            out += "零"
        out += DIGITS[n % 10]
    return out


# Held-out questions: their exact (template, numbers) never appear in the training pairs.
HELDOUT = [
    {"prompt": "3加5等于多少？", "answer": "8", "expect": "3加5等于8"},
    {"prompt": "7千米等于多少米？", "answer": "7000", "expect": "7000米"},
    {"prompt": "星期四的后一天是星期几？", "answer": "星期五", "expect": "星期五"},
]
_HELDOUT_PROMPTS = {h["prompt"] for h in HELDOUT}

EVERYDAY_QA = [
    ("你好", "你好！我是一个小型中文对话模型，有什么可以帮你的吗？"),
    ("你是谁？", "我是一个从零开始训练的小型中文对话模型。"),
    ("今天心情不好怎么办？", "可以出去散散步，听听音乐，或者和朋友聊聊天。"),
    ("怎样保持健康？", "规律作息，均衡饮食，适量运动，保持好心情。"),
    ("推荐一种早餐。", "一碗小米粥，一个鸡蛋，再加一些青菜，简单又营养。"),
    ("如何学习中文？", "多听多说，每天读一点文章，坚持练习写字。"),
    ("为什么要多喝水？", "水能帮助身体代谢，调节体温，保持皮肤湿润。"),
    ("睡不着觉怎么办？", "睡前少看手机，保持房间安静，可以喝一杯温牛奶。"),
    ("中国的首都是哪里？", "中国的首都是北京。"),
    ("一年有几个季节？", "一年有四个季节：春、夏、秋、冬。"),
    ("太阳从哪边升起？", "太阳从东边升起，从西边落下。"),
    ("水在多少度结冰？", "在标准大气压下，水在零摄氏度结冰。"),
    ("一天有多少小时？", "一天有二十四小时。"),
    ("一小时有多少分钟？", "一小时有六十分钟。"),
    ("熊猫吃什么？", "大熊猫主要吃竹子。"),
    ("长城在哪个国家？", "长城在中国。"),
    ("怎么做番茄炒蛋？", "先把鸡蛋炒熟盛出，再炒番茄出汁，最后放回鸡蛋，加盐翻炒即可。"),
    ("下雨天出门要带什么？", "下雨天出门记得带雨伞，穿防水的鞋子。"),
    ("如何提高记忆力？", "保证睡眠，经常复习，把新知识和旧知识联系起来。"),
    ("学习累了怎么办？", "站起来活动一下，看看远处，休息十分钟再继续。"),
    ("猫和狗哪个更好？", "猫和狗各有优点，猫比较安静，狗比较热情，看你喜欢哪一种。"),
    ("什么是光合作用？", "光合作用是植物利用阳光，把二氧化碳和水变成养分并放出氧气的过程。"),
    ("地球绕着什么转？", "地球绕着太阳转，转一圈大约是一年。"),
    ("月亮为什么会发光？", "月亮本身不发光，它反射的是太阳的光。"),
    ("写一句关于春天的话。", "春天来了，小草发芽，花儿开放，到处都是绿色。"),
    ("谢谢你", "不客气，很高兴能帮到你！"),
    ("再见", "再见，祝你生活愉快！"),
    ("给我讲个笑话。", "小明问妈妈：我是从哪里来的？妈妈说：你是从作业本里爬出来的。"),
    ("怎样节约用水？", "洗手时随手关水龙头，用洗菜水浇花，及时修理漏水的管子。"),
    ("运动前要注意什么？", "运动前先热身，活动关节，避免受伤。"),
    ("Python是什么？", "Python是一种简单易学的编程语言，常用于数据分析和人工智能。"),
    ("什么是人工智能？", "人工智能是让计算机模仿人类思考和学习的技术。"),
]

PROSE = [
    "春天到了，公园里的花都开了，小朋友们在草地上放风筝。",
    "北京是中国的首都，有很多名胜古迹，比如故宫和长城。",
    "每天早上，爷爷都会去河边散步，呼吸新鲜的空气。",
    "学习是一件快乐的事情，读书可以让我们了解更广阔的世界。",
    "秋天的稻田一片金黄，农民伯伯忙着收割庄稼。",
    "大熊猫是中国的国宝，它们喜欢吃竹子，性格温和。",
    "下雨了，街上的行人撑起了五颜六色的雨伞。",
    "妈妈做的饭菜特别香，全家人围坐在一起吃晚饭。",
    "科学家通过实验发现，植物的生长需要阳光、水和空气。",
    "冬天下雪的时候，孩子们在院子里堆雪人、打雪仗。",
]


# Every fact is taught in several surface forms (templates). A held-out question is one (template, operands)
# combination left out of everything the model trains on: answering it means carrying the fact over from the
# other templates and the template over from the other operands. (With one template per fact the 2-layer model
# memorised the table and answered 3加5 with 9 and the day after Thursday with Wednesday, every seed.)
ADD_TEMPLATES = [  # (prompt, response) with {a} + {b} = {c}
    ("{a}加{b}等于多少？", "{a}加{b}等于{c}。"),  # the held-out 3加5 template
    ("{a}加{b}是多少？", "{a}加{b}是{c}。"),
    ("{a}加上{b}得多少？", "{a}加上{b}得{c}。"),
    ("{a}与{b}的和是多少？", "{a}与{b}的和是{c}。"),
    ("{a}和{b}相加得几？", "{a}和{b}相加得{c}。"),
    ("算一算：{a}+{b}=？", "{a}+{b}={c}。"),
    ("比{a}多{b}的数是几？", "比{a}多{b}的数是{c}。"),
    ("小明有{a}个苹果，又买了{b}个，一共有几个？", "一共有{c}个苹果。"),
]
SUB_TEMPLATES = [  # {c} - {b} = {a}
    ("{c}减{b}等于多少？", "{c}减{b}等于{a}。"),
    ("{c}减去{b}是多少？", "{c}减去{b}是{a}。"),
    ("{c}比{b}多几？", "{c}比{b}多{a}。"),
]
UNITS = [("千米", "米", 1000), ("千克", "克", 1000), ("米", "厘米", 100), ("元", "角", 10)]
UNIT_TEMPLATES = [  # {n}{big} = {m}{small}
    ("{n}{big}等于多少{small}？", "{n}{big}等于{m}{small}。"),  # the held-out 7千米 template
    ("{n}{big}是多少{small}？", "{n}{big}是{m}{small}。"),
    ("{n}{big}合多少{small}？", "{n}{big}合{m}{small}。"),
    ("{n}{big}有多少{small}？", "{n}{big}有{m}{small}。"),
    ("把{n}{big}换算成{small}。", "{n}{big}换算成{small}是{m}{small}。"),
    ("{m}{small}等于多少{big}？", "{m}{small}等于{n}{big}。"),
]
NEXT_DAY = [  # {d} -> the day after, {x}
    ("{d}的后一天是星期几？", "{d}的后一天是{x}。"),  # the held-out 星期四 template
    ("{d}的下一天是星期几？", "{d}的下一天是{x}。"),
    ("{d}的第二天是星期几？", "{d}的第二天是{x}。"),
    ("{d}过后是星期几？", "{d}过后是{x}。"),
    ("{d}之后的一天是星期几？", "{d}之后的一天是{x}。"),
    ("{d}再过一天是星期几？", "{d}再过一天是{x}。"),
    ("今天是{d}，明天是星期几？", "今天是{d}，明天是{x}。"),
    ("昨天是{d}，今天是星期几？", "昨天是{d}，今天是{x}。"),
]
PREV_DAY = [  # {d} -> the day before, {x}
    ("{d}的前一天是星期几？", "{d}的前一天是{x}。"),
    ("{d}的上一天是星期几？", "{d}的上一天是{x}。"),
    ("{d}之前的一天是星期几？", "{d}之前的一天是{x}。"),
    ("今天是{d}，昨天是星期几？", "今天是{d}，昨天是{x}。"),
    ("明天是{d}，今天是星期几？", "明天是{d}，今天是{x}。"),
]
NEXT_MONTH = [("{d}的后一个月是几月？", "{d}的后一个月是{x}。"), ("{d}的下一个月是几月？", "{d}的下一个月是{x}。"),
              ("{d}过后是几月？", "{d}过后是{x}。")]
PREV_MONTH = [("{d}的前一个月是几月？", "{d}的前一个月是{x}。"), ("{d}的上一个月是几月？", "{d}的上一个月是{x}。")]
NEXT_NUMBER = [("{d}的后一个数是几？", "{d}的后一个数是{x}。"), ("{d}的下一个数是几？", "{d}的下一个数是{x}。")]
PREV_NUMBER = [("{d}的前一个数是几？", "{d}的前一个数是{x}。")]

# What a held-out question shares with no training text: its template with its operands ("3加5等于" would also
# match "13加5等于...", so such rows are dropped too). tests/test_demo_data.py checks every generated file.
HELDOUT_CORES = ["3加5等于", "7千米等于", "星期四的后一天"]


def _fill(templates, reps: int = 1, **values) -> list[tuple[str, str]]:
    return [(p.format(**values), r.format(**values)) for p, r in templates] * reps


def arithmetic_pairs(rng: random.Random) -> list[tuple[str, str]]:
    pairs = []
    for a in range(0, 10):
        for b in range(0, 10):
            pairs += _fill(ADD_TEMPLATES, a=a, b=b, c=a + b)
            pairs += _fill(SUB_TEMPLATES, a=a, b=b, c=a + b)
    return pairs


def unit_pairs(rng: random.Random) -> list[tuple[str, str]]:
    pairs = []
    for big, small, factor in UNITS:
        for n in range(1, 41):
            templates = UNIT_TEMPLATES if n <= 12 else rng.sample(UNIT_TEMPLATES, 2)
            pairs += _fill(templates, n=n, m=n * factor, big=big, small=small)
    return pairs


def numeral_pairs(rng: random.Random) -> list[tuple[str, str]]:
    pairs = []
    for n in list(range(0, 100)) + rng.sample(range(100, 1000), 40):
        pairs.append((f"把数字{n}写成中文。", f"{n}写成中文是{chinese_number(n)}。"))
    return pairs


def calendar_pairs(reps: int = 3) -> list[tuple[str, str]]:
    """Weekdays and months, each step in several templates (repeated: there are only 7 and 12 of them)."""
    pairs = []
    for i, d in enumerate(WEEKDAYS):
        pairs += _fill(NEXT_DAY, reps, d=d, x=WEEKDAYS[(i + 1) % 7])
        pairs += _fill(PREV_DAY, reps, d=d, x=WEEKDAYS[(i - 1) % 7])
    for i, m in enumerate(MONTHS):
        pairs += _fill(NEXT_MONTH, d=m, x=MONTHS[(i + 1) % 12])
        pairs += _fill(PREV_MONTH, d=m, x=MONTHS[(i - 1) % 12])
    for n in range(1, 50):
        pairs += _fill(NEXT_NUMBER, d=n, x=n + 1) + _fill(PREV_NUMBER, d=n, x=n - 1)
    return pairs


def is_heldout(text: str) -> bool:
    """True when a text contains a held-out question's (template, operands) core."""
    return any(core in text for core in HELDOUT_CORES)


def sft_split(seed: int = SEED) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, valid) pairs. Valid rows come from the many-row facts only (unit conversions and next/previous
    numbers above 20, numerals above 99), so no sum, weekday or month loses a training template."""
    rng = random.Random(seed)
    arith, units, numerals = arithmetic_pairs(rng), unit_pairs(rng), numeral_pairs(rng)
    pairs = arith + units + numerals + calendar_pairs() + EVERYDAY_QA * 3
    pairs = [p for p in pairs if p[0] not in _HELDOUT_PROMPTS and not is_heldout(p[0] + p[1])]
    many = re.compile(r"^((2[1-9]|[3-9]\d)[^\d]|把数字\d\d\d)")
    bulk = sorted({p for p in pairs if many.match(p[0])})
    valid = set(rng.sample(bulk, max(20, len(pairs) // 40)))
    train = [p for p in pairs if p not in valid]
    rng.shuffle(train)
    return train, sorted(valid)


def corpus_lines(seed: int = SEED) -> list[str]:
    """Plain text for tokenizer training and pretraining: prose plus every training fact written as a sentence."""
    rng = random.Random(seed + 1)
    lines = list(PROSE) * 3
    lines += [r for _, r in sft_split(seed)[0]]
    lines += [f"{q}{a}" for q, a in EVERYDAY_QA]
    rng.shuffle(lines)
    return lines


def dpo_triples() -> list[dict]:
    rows = []
    for q, a in EVERYDAY_QA[:16]:
        rows.append({"prompt": q, "chosen": a, "rejected": "不知道。"})
    for a in range(1, 9):
        b = 9 - a
        rows.append({"prompt": f"{a}加{b}等于多少？", "chosen": f"{a}加{b}等于9。", "rejected": f"{a}加{b}等于{a + b + 2}。"})
    return rows


IE_EXAMPLES = [
    ("《平凡的世界》是路遥创作的长篇小说。", [("平凡的世界", "作者", "路遥")]),
    ("周杰伦演唱了歌曲《晴天》，这首歌由方文山作词。", [("晴天", "歌手", "周杰伦"), ("晴天", "作词", "方文山")]),
    ("北京大学位于北京市海淀区。", [("北京大学", "所在城市", "北京")]),
    ("李白是唐朝著名诗人，出生于碎叶城。", [("李白", "朝代", "唐朝"), ("李白", "出生地", "碎叶城")]),
    ("电影《英雄》由张艺谋执导。", [("英雄", "导演", "张艺谋")]),
    ("马云创立了阿里巴巴集团。", [("阿里巴巴集团", "创始人", "马云")]),
    ("《红楼梦》的作者是曹雪芹。", [("红楼梦", "作者", "曹雪芹")]),
    ("姚明出生于上海，身高二米二六。", [("姚明", "出生地", "上海"), ("姚明", "身高", "二米二六")]),
]

CEVAL_QUESTIONS = {
    "demo_math": ("Demo Math", "示例数学", "STEM", [
        ("2加3等于多少？", "4", "5", "6", "7", "B"),
        ("10减4等于多少？", "6", "5", "4", "7", "A"),
        ("1千米等于多少米？", "10米", "100米", "1000米", "10000米", "C"),
        ("一小时有多少分钟？", "30", "100", "24", "60", "D"),
        ("7加1等于多少？", "9", "8", "6", "7", "B"),
    ]),
    "demo_common_sense": ("Demo Common Sense", "示例常识", "Other", [
        ("中国的首都是哪里？", "上海", "广州", "北京", "深圳", "C"),
        ("大熊猫主要吃什么？", "竹子", "鱼", "肉", "米饭", "A"),
        ("太阳从哪边升起？", "西边", "东边", "南边", "北边", "B"),
        ("一年有几个季节？", "两个", "三个", "五个", "四个", "D"),
        ("星期一的后一天是星期几？", "星期日", "星期二", "星期三", "星期五", "B"),
    ]),
}


def write_demo_data(out_dir: str | Path = "data/demo", seed: int = SEED) -> dict:
    """Write every demo file; returns their paths. Deterministic for a given seed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, valid = sft_split(seed)
    paths = {}
    paths["corpus"] = out / "corpus.txt"
    paths["corpus"].write_text("\n".join(corpus_lines(seed)) + "\n", encoding="utf-8")
    paths["sft"] = out / "sft.parquet"
    pd.DataFrame(train, columns=["prompt", "response"]).to_parquet(paths["sft"], index=False)
    paths["sft_valid"] = out / "sft_valid.parquet"
    pd.DataFrame(valid, columns=["prompt", "response"]).to_parquet(paths["sft_valid"], index=False)
    paths["heldout"] = out / "heldout.json"
    paths["heldout"].write_text(json.dumps(HELDOUT, ensure_ascii=False, indent=1), encoding="utf-8")
    paths["dpo"] = out / "dpo.parquet"
    pd.DataFrame(dpo_triples()).to_parquet(paths["dpo"], index=False)
    paths["ie"] = out / "ie_duie.json"
    with open(paths["ie"], "w", encoding="utf-8") as f:
        for text, spo in IE_EXAMPLES:
            rec = {"text": text, "spo_list": [{"subject": s, "predicate": p, "object": {"@value": o}}
                                              for s, p, o in spo]}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    ceval = out / "ceval"
    mapping = {}
    for split in ("dev", "val"):
        (ceval / split).mkdir(parents=True, exist_ok=True)
    for subject, (en, zh, cat, qs) in CEVAL_QUESTIONS.items():
        mapping[subject] = [en, zh, cat]
        rows = [dict(id=i, question=q, A=a, B=b, C=c, D=d, answer=ans) for i, (q, a, b, c, d, ans) in enumerate(qs)]
        pd.DataFrame(rows[:2]).to_csv(ceval / "dev" / f"{subject}_dev.csv", index=False)
        pd.DataFrame(rows[2:]).to_csv(ceval / "val" / f"{subject}_val.csv", index=False)
    (ceval / "subject_mapping.json").write_text(json.dumps(mapping, ensure_ascii=False, indent=1), encoding="utf-8")
    paths["ceval"] = ceval
    return {k: str(v) for k, v in paths.items()}


def main(out_dir: str = "data/demo", seed: int = SEED):
    paths = write_demo_data(out_dir, seed)
    for k, v in paths.items():
        print(f"{k:10s} {v}")


if __name__ == "__main__":
    import fire
    fire.Fire(main)
