// The page's interface text in the browser's language: English, or Chinese for zh-* (navigator.languages).
// Static text carries data-i18n / data-i18n-placeholder keys; app.js formats its messages through t().
"use strict";

const MESSAGES = {
  en: {
    subtitle: "image search", searchLabel: "Search text", placeholder: "Describe what you are looking for, e.g. a red circle",
    search: "Search", byExample: "Search by example image", dropHere: "drop an image here, or", chooseFile: "choose a file",
    apiKey: "API key", apiKeyPlaceholder: "this server needs an API key", askTitle: "Ask about an image", createTitle: "Create an image", createPlaceholder: "e.g. a purple star", create: "Create",
    chooseImage: "choose an image", questionPlaceholder: "e.g. what color is the star?", ask: "Ask", caption: "Caption",
    chatTitle: "Chat about an image", chatPlaceholder: "e.g. what colour is the star?", send: "Send", newChat: "New chat",
    connecting: "connecting…", searching: "searching…",
    results: "{n} results for {what} (of {total} indexed images)", noResults: "No results for {what}.",
    typeSomething: "Type something to search for, or drop an example image.",
    serverInfo: "model {model} · {index}", indexed: "{n} images indexed",
  },
  zh: {
    subtitle: "图片搜索", searchLabel: "搜索文字", placeholder: "描述你要找的图片，例如：一个红色的圆形",
    search: "搜索", byExample: "以图搜图", dropHere: "把图片拖到这里，或", chooseFile: "选择文件",
    apiKey: "API 密钥", apiKeyPlaceholder: "这个服务器需要 API 密钥", askTitle: "就图片提问", createTitle: "生成图片", createPlaceholder: "例如：一个紫色的五角星", create: "生成",
    chooseImage: "选择图片", questionPlaceholder: "例如：五角星是什么颜色的？", ask: "提问", caption: "描述图片",
    chatTitle: "就图片聊天", chatPlaceholder: "例如：五角星是什么颜色的？", send: "发送", newChat: "新对话",
    connecting: "正在连接…", searching: "正在搜索…",
    results: "“{what}”的 {n} 个结果（共 {total} 张已索引图片）", noResults: "没有找到“{what}”。",
    typeSomething: "请输入要搜索的内容，或拖入一张示例图片。",
    serverInfo: "模型 {model} · {index}", indexed: "已索引 {n} 张图片",
  },
};

const LANG = (navigator.languages && navigator.languages[0] || navigator.language || "en")
  .toLowerCase().startsWith("zh") ? "zh" : "en";

function t(key, vars) {
  let text = (MESSAGES[LANG] && MESSAGES[LANG][key]) || MESSAGES.en[key] || key;
  for (const [name, value] of Object.entries(vars || {})) text = text.split("{" + name + "}").join(String(value));
  return text;
}

function translatePage() {
  document.documentElement.lang = LANG === "zh" ? "zh-CN" : "en";
  for (const el of document.querySelectorAll("[data-i18n]")) {
    const target = el.querySelector(":scope > input") ? el.firstChild : el;  // a label wrapping its input
    target.textContent = t(el.dataset.i18n) + (target === el ? "" : "\n");
  }
  for (const el of document.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
}

translatePage();
