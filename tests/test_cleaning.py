"""Cleaning keeps text intact: each of the reference's cleaning bugs is shown not to happen here."""
from __future__ import annotations

import re

import pytest

from utils.text_cleaning import (CleanOptions, clean_text, collapse_repeated_punctuation, dice_similarity,
                                 fix_cjk_ascii_punctuation, normalize_unicode, normalize_whitespace, split_sentences,
                                 strip_ansi, strip_control_chars, strip_html, title_desc_prompt, to_simplified,
                                 troff_to_text)


def reference_remove_duplicate_punctuation(sentence: str) -> str:
    """What the reference's cleaner did (re-stated here to show the tests catch its faults): every space became
    '，', and a run of "punctuation" kept its first character, where the set built from a string containing
    ``\\s`` and ``\\n`` also held the letters ``s`` and ``n`` and the backslash."""
    punctuation = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~.,;《》？！“”‘’@#￥%…&×（）——+【】{};；●，。&～、|\\s:：\\n")
    sentence = re.sub(" |　", "，", sentence)
    ans, p, n = "", 0, len(sentence)
    while p < n:
        ans += sentence[p]
        while p + 1 < n and sentence[p] in punctuation and sentence[p + 1] in punctuation:
            p += 1
        p += 1
    return ans


def reference_en_to_zh_punct(sentence: str) -> str:
    for en, zh in zip(",().!;:", "，（）。！；："):
        sentence = sentence.replace(en, zh)
    return sentence


# ------------------------------------------------------------------ the reference's faults do not happen here
def test_letters_s_and_n_are_not_punctuation():
    text = "class success, annual planning; process ss and nn"
    assert "clas" in reference_remove_duplicate_punctuation("class")  # the reference dropped an 's' ...
    assert reference_remove_duplicate_punctuation("class") != "class"
    assert clean_text(text) == text  # ... we keep every letter


def test_backslash_n_literal_is_kept():
    code = r'print("a\nb")'
    assert clean_text(code) == code


def test_spaces_are_not_turned_into_commas():
    assert reference_remove_duplicate_punctuation("I love NLP") == "I，love，NLP"
    assert clean_text("I love NLP") == "I love NLP"
    assert clean_text("使用 Python 和 PyTorch 训练模型") == "使用 Python 和 PyTorch 训练模型"


@pytest.mark.parametrize("text", ["圆周率约为3.14。", "价格是1,000元", "会议在10:30开始", "版本 v2.0.1 发布",
                                  "e.g. this is fine", "见 https://example.com/a.b?c=1"])
def test_decimals_and_ascii_punctuation_between_digits_survive(text):
    assert reference_en_to_zh_punct("3.14") == "3。14"  # the reference's fault
    assert clean_text(text) == text


def test_code_indentation_is_kept():
    code = "def average(a, b):\n    if b:\n\treturn (a + b) / 2\n    return a"
    assert clean_text(code) == code


def test_newlines_inside_answers_are_kept():
    answer = "步骤如下：\n1. 打开冰箱\n2. 放入大象\n\n3. 关上门"
    assert clean_text(answer) == answer
    assert clean_text("a\n\n\n\n\nb") == "a\n\nb"


def test_full_width_chinese_punctuation_is_kept():
    text = "你好，世界！这是什么？答：（一）《书名》“引号”‘单引号’；冒号：顿号、省略号……破折号——"
    assert clean_text(text) == text


def test_no_nfkc_damage():
    assert clean_text("面积 100m²，①第一点") == "面积 100m²，①第一点"
    # full-width letters and digits are folded, the ideographic space becomes a space
    assert normalize_unicode("ＡＢＣ１２３　ｘ") == "ABC123 x"
    assert normalize_unicode("总资产逾２．５亿元。") == "总资产逾2.5亿元。"  # full-width decimal point


# ------------------------------------------------------------------ the cleaning steps
def test_traditional_to_simplified():
    assert to_simplified("學而時習之，不亦說乎？") == "学而时习之，不亦说乎？"
    assert to_simplified("简体中文保持不变") == "简体中文保持不变"
    assert clean_text("頭髮") == "头发"


def test_t2s_can_be_switched_off():
    assert clean_text("學習", CleanOptions(t2s=False)) == "學習"


def test_ansi_escapes_and_control_characters():
    assert strip_ansi("\x1b[32m《春晓》\x1b[m \x1b[1;33mx\x1b[0m") == "《春晓》 x"
    assert strip_control_chars("a\x00b\x07c\x7fd\ne") == "abcd\ne"
    assert clean_text("\x1b[33m作者：孟浩然\x1b[m\x0c") == "作者：孟浩然"
    assert clean_text("行一\r\n行二\r行三") == "行一\n行二\n行三"


def test_html_tags_and_entities():
    assert strip_html("<p>第一段</p><p>第二段<br/>换行</p>") == "\n第一段\n\n第二段\n换行\n"
    assert clean_text("<div class='x'>A&amp;B &lt;tag&gt; &#20013;</div>", CleanOptions(html=True)) == "A&B <tag> 中"
    assert strip_html("if a<b: pass # List<String> x") == "if a<b: pass # List<String> x"  # not tags
    assert strip_html('<a href="x.html" class=link>链接</a><IMG SRC=a.png>') == "链接"
    assert strip_html("<script>var x=1;</script>正文") == "正文"


def test_html_is_left_alone_unless_asked():
    code = "用 <div> 包住内容"
    assert clean_text(code) == code


def test_troff_markup():
    src = "\n".join([
        '.\\" comment', ".TH LS 1 2022 GNU", ".SH 名称", "ls \\- 列出目录内容", ".SH 描述", ".PP",
        "列出\\fB文件\\fP的信息，", "并排序。", ".TP", "\\fB\\-a\\fR, \\fB\\-\\-all\\fR", "不要忽略以点号起始的条目",
        ".de XX", "junk", "..", ".nf", "code  line 1", "code line 2", ".fi", "\\(em 完 \\(co",
    ])
    text = troff_to_text(src)
    assert "comment" not in text and "junk" not in text and "\\f" not in text and ".TH" not in text
    assert "ls - 列出目录内容" in text
    assert "-a, --all\n不要忽略以点号起始的条目" in text
    assert "code  line 1\ncode line 2" in text
    assert "— 完 ©" in text
    assert clean_text(text).count("列出文件的信息，并排序。") == 1  # filled lines joined, space between CJK removed


def test_repeated_punctuation_collapses_but_ellipses_stay():
    assert collapse_repeated_punctuation("好！！！！真的吗？？？。。。。") == "好！真的吗？。"
    assert collapse_repeated_punctuation("等等……………") == "等等……"
    assert collapse_repeated_punctuation("wait.....") == "wait..."
    assert collapse_repeated_punctuation("a,,,b，，c") == "a,,,b，c"  # ASCII runs only after Chinese text
    assert clean_text("太好了!!!真的吗??") == "太好了！真的吗？"
    for code in ("for(;;) {}", "x = a ?? b", "y = !!x", "~~删除线~~", "1,,,2"):
        assert clean_text(code) == code
    assert collapse_repeated_punctuation("------") == "------"  # markdown rules stay
    assert collapse_repeated_punctuation("success") == "success"


def test_ascii_punctuation_after_chinese_becomes_full_width():
    assert fix_cjk_ascii_punctuation("房间太小,其他的都一般.") == "房间太小，其他的都一般。"
    assert fix_cjk_ascii_punctuation("真的吗?好!") == "真的吗？好！"
    assert fix_cjk_ascii_punctuation("Hello, world. 3.14") == "Hello, world. 3.14"
    assert fix_cjk_ascii_punctuation("x = '中文,'") == "x = '中文,'"  # inside code quotes: not followed by CJK/space


def test_whitespace():
    assert normalize_whitespace("你好  世界 ， hello   world  ") == "你好世界， hello world"
    assert normalize_whitespace("a  \n  b") == "a\n  b"  # indentation is kept
    assert normalize_whitespace("x  \n   \n\n\n\ny") == "x\n\ny"
    assert normalize_whitespace("第一行\n第二行", keep_newlines=False) == "第一行第二行"


def test_unknown_option_is_an_error():
    with pytest.raises(ValueError, match="unknown cleaning option"):
        CleanOptions.from_dict({"nfkc": True})


def test_replacement_characters_are_removed():
    assert clean_text("啦\ufffd\ufffd啦") == "啦啦"


# ------------------------------------------------------------------ the reference's prompt rule
def test_title_desc_prompt_rule():
    assert dice_similarity("abc", "abc") == 1.0
    # near-identical title and description: keep one
    assert title_desc_prompt("高血压能吃党参吗", "高血压能吃党参吗？") == "高血压能吃党参吗？"  # desc starts with title
    assert title_desc_prompt("糖尿病如何治疗", "糖尿病治疗如何") == "糖尿病如何治疗"
    assert title_desc_prompt("糖尿病如何治疗", "糖尿病治疗如何", prefer="desc") == "糖尿病治疗如何"
    # different: title then description, separated unless the title ends with a sentence mark
    assert title_desc_prompt("哪家医院能治胃反流", "烧心，打隔，咳嗽低烧") == "哪家医院能治胃反流\n烧心，打隔，咳嗽低烧"
    assert title_desc_prompt("胃反流怎么办？", "烧心，打隔") == "胃反流怎么办？烧心，打隔"
    assert title_desc_prompt("标题", "") == "标题"
    assert title_desc_prompt("", "描述") == "描述"


def test_split_sentences():
    assert split_sentences("第一句。第二句！第三句？尾巴") == ["第一句。", "第二句！", "第三句？", "尾巴"]
    assert split_sentences("圆周率是3.14。好") == ["圆周率是3.14。", "好"]
