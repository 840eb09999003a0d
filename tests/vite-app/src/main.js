import "./style.css";

const response = await fetch("/api/hello");
document.querySelector("#app").textContent = (await response.json()).message;
