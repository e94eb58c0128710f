"""Writes kb.tsv (about 2k triples) and questions.jsonl (200 questions) in KgCLUE's formats.

    python tests/data/kgclue/make_dataset.py

Deterministic (seeded). Chinese and English entities, with the hard cases
of real KgCLUE data: homonym subjects told apart by a bracketed kind
(夜曲（歌曲） / 夜曲（小说）), keys that are prefixes of other keys
(作者 / 作者简介 on one subject), predicates sharing a prefix (出生 /
出生地 / 出生日期), one (subject, predicate) with several objects, and
rare characters (䶮, 龘, 𪚥).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

ZH_NAMES = list("李王张刘陈杨赵黄周吴徐孙胡朱高林何郭马罗梁宋郑谢韩唐冯于董萧程曹袁邓许傅沈曾彭吕苏卢蒋蔡贾丁魏薛叶阎")
ZH_GIVEN = list("伟芳娜秀敏静丽强磊军洋勇艳杰娟涛明超秀兰霞平刚桂英华建国志远海波文斌") + ["䶮", "龘", "𪚥"]
ZH_WORKS = ["夜曲", "晴天", "稻香", "青花瓷", "红楼", "长河", "春风", "白夜", "远方", "故乡", "明月", "星辰"]
ZH_KINDS = ["（歌曲）", "（小说）", "（电影）"]
ZH_PLACES = ["北京", "上海", "广州", "杭州", "成都", "西安", "南京", "武汉", "长沙", "昆明", "苏州", "厦门"]
EN_FIRST = ["Alice", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemal", "Lena",
            "Marta", "Nils", "Olga", "Pablo", "Rosa", "Sven", "Tomas", "Vera"]
EN_LAST = ["Moreau", "Novak", "Okafor", "Petrov", "Quinn", "Rossi", "Silva", "Tanaka", "Ulrich", "Varga", "Weber", "Young",
           "Andersen", "Bauer", "Costa", "Dubois", "Eriksen", "Fischer", "Garcia", "Horvat"]
EN_PLACES = ["Lyon", "Porto", "Graz", "Turku", "Ghent", "Bergen", "Krakow", "Seville", "Bologna", "Utrecht"]


def zh_person(rng):
    return rng.choice(ZH_NAMES) + "".join(rng.choice(ZH_GIVEN) for _ in range(rng.randint(1, 2)))


def en_person(rng):
    return f"{rng.choice(EN_FIRST)} {rng.choice(EN_LAST)}"


def main() -> None:
    rng = random.Random(2024)
    triples: dict[tuple[str, str], list[str]] = {}

    def add(subject, predicate, obj):
        objects = triples.setdefault((subject, predicate), [])
        if obj not in objects:
            objects.append(obj)

    people = set()
    while len(people) < 500:
        people.add(zh_person(rng) if len(people) % 2 else en_person(rng))
    for person in sorted(people):
        chinese = not person.isascii()
        place = rng.choice(ZH_PLACES if chinese else EN_PLACES)
        year = rng.randint(1900, 2005)
        if chinese:
            add(person, "出生", f"{year}年")
            add(person, "出生地", place)
            add(person, "出生日期", f"{year}年{rng.randint(1, 12)}月{rng.randint(1, 28)}日")
            add(person, "职业", rng.choice(["歌手", "作家", "导演", "演员", "画家"]))
        else:
            add(person, "birth place", place)
            add(person, "birth date", f"{year}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}")
            add(person, "occupation", rng.choice(["singer", "writer", "director", "actor", "painter"]))
    writers = sorted(p for p in people if not p.isascii())
    for work in ZH_WORKS:
        for kind in ZH_KINDS:
            subject = work + kind
            author = rng.choice(writers)
            add(subject, "作者", author)
            add(subject, "作者简介", f"{author}，{rng.choice(ZH_PLACES)}人")
            add(subject, "发行时间", f"{rng.randint(1980, 2020)}年")
            if kind == "（歌曲）":
                for singer in rng.sample(writers, 2):  # one (subject, predicate), several objects
                    add(subject, "演唱", singer)
    for place in ZH_PLACES:
        add(place, "所属国家", "中国")
        add(place, "人口", f"{rng.randint(300, 2500)}万")
        add(place, "别名", rng.choice(["古城", "花城", "春城", "江城", "泉城"]))
    for place in EN_PLACES:
        add(place, "country", rng.choice(["France", "Portugal", "Austria", "Finland", "Belgium", "Norway", "Poland", "Spain", "Italy", "Netherlands"]))
        add(place, "population", str(rng.randint(100_000, 900_000)))
        add(place, "river", rng.choice(["Rhone", "Douro", "Mur", "Aura", "Scheldt", "Vistula", "Guadalquivir", "Reno", "Vecht"]))

    lines = [f"{s}\t{p}\t{o}" for (s, p), objects in sorted(triples.items()) for o in objects]
    (HERE / "kb.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")

    zh_templates = {"出生": "{s}是哪一年出生的？", "出生地": "{s}的出生地是哪里？", "出生日期": "{s}的出生日期是什么？",
                    "职业": "{s}是做什么的？", "作者": "{s}的作者是谁？", "作者简介": "介绍一下{s}的作者。",
                    "发行时间": "{s}是什么时候发行的？", "演唱": "{s}是谁唱的？", "所属国家": "{s}属于哪个国家？",
                    "人口": "{s}有多少人口？", "别名": "{s}的别名是什么？"}
    en_templates = {"birth place": "Where was {s} born?", "birth date": "When was {s} born?", "occupation": "What does {s} do?",
                    "country": "Which country is {s} in?", "population": "What is the population of {s}?",
                    "river": "Which river flows through {s}?"}
    keys = sorted(triples)
    rng.shuffle(keys)
    hard = [k for k in keys if "（" in k[0] or k[1] in ("作者简介", "出生日期", "演唱") or any(c in k[0] for c in "䶮龘𪚥")]
    chosen = (hard[:80] + [k for k in keys if k not in hard[:80]])[:200]
    rng.shuffle(chosen)
    with (HERE / "questions.jsonl").open("w", encoding="utf-8") as file:
        for number, (subject, predicate) in enumerate(chosen):
            template = zh_templates.get(predicate) or en_templates[predicate]
            answer = f"{subject} ||| {predicate} ||| {triples[(subject, predicate)][0]}"
            file.write(json.dumps({"id": number, "question": template.format(s=subject), "answer": answer}, ensure_ascii=False) + "\n")
    print(f"{len(lines)} triples, {len(chosen)} questions")


if __name__ == "__main__":
    main()
